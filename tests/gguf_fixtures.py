"""GGUF files of the real SmolLM2 model in other types, for tests that need llama.cpp-ready files.

The shipped Q4_1 file is dequantized (gguf-py's reference dequantizer) and written again with every
metadata field kept: as F32/F16, or with its 2-D weights quantized by ggml's own quantizer (the oracle).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf import quants as gguf_quants

FILE_TYPES = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
}


def requantize_gguf(src: Path, dst: Path, type_name: str) -> Path:
    """Write ``src`` again as ``dst`` with its 2-D tensors in ``type_name`` (1-D tensors stay F32). Cached."""
    if dst.is_file():
        return dst
    from llmquant.oracles.ggml import ggml_quantize

    reader = GGUFReader(src, "r")
    arch = reader.fields["general.architecture"].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            if key == "general.file_type":
                writer.add_file_type(int(FILE_TYPES[type_name]))
                continue
            main = field.types[0]
            sub = field.types[-1] if main == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), main, sub_type=sub)
        for tensor in reader.tensors:
            values = gguf_quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            rows_shape = tuple(int(d) for d in reversed(tensor.shape))  # numpy order: row length last
            values = values.reshape(rows_shape)
            if values.ndim == 1 or type_name == "F32":
                writer.add_tensor(tensor.name, values)
            elif type_name == "F16":
                writer.add_tensor(tensor.name, values.astype(np.float16))
            else:
                qtype = GGMLQuantizationType[type_name]
                data = ggml_quantize(values.reshape(-1, rows_shape[-1]), type_name)
                writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.rename(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        import os

        os.close(fd)
    return dst


def smollm2_gguf_as(src: Path, cache: Path, type_name: str) -> Path:
    return requantize_gguf(src, cache / f"smollm2-135m-{type_name}.gguf", type_name)


__all__ = ["requantize_gguf", "smollm2_gguf_as"]


def small_vocab_tokenizer_gguf(src: Path, dst: Path, n_tokens: int = 512) -> Path:
    """A GGUF holding only ``src``'s tokenizer, cut to its first ``n_tokens`` tokens (and the merges among them).

    Tiny test models built on it keep llama.cpp's real BPE vocabulary format while their embedding and output
    matrices stay small. Cached.
    """
    if dst.is_file():
        return dst
    reader = GGUFReader(src, "r")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:n_tokens]
    kept = set(tokens)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    writer = GGUFWriter(tmp, str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:n_tokens]
        elif key == "tokenizer.ggml.merges":
            value = [m for m in value if m.replace(" ", "") in kept and all(p in kept for p in m.split(" "))]
        elif key.endswith("_token_id") and int(value) >= n_tokens:
            continue
        main = field.types[0]
        writer.add_key_value(key, value, main, sub_type=field.types[-1] if main == GGUFValueType.ARRAY else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst
