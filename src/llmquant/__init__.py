"""llmquant: make large language models small, in llama.cpp's GGUF formats."""

__version__ = "0.1.0"
