"""GGUF files through llama.cpp's ``gguf`` package: reading, summarising, writing; imatrix files."""

from llmquant.gguf_io.reader import GGUFSummary, TensorInfo, open_gguf, summarize_gguf

__all__ = ["GGUFSummary", "TensorInfo", "open_gguf", "summarize_gguf"]
