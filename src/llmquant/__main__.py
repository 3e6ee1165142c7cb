from llmquant.cli import main

main()
