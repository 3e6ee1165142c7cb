"""llama.cpp's own code, reached through llama-cpp-python: the oracles tests and benchmarks compare against.

Nothing in the main pipeline depends on this package; it needs the optional extra ``llamacpp``.
"""
