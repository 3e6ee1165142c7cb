"""Text to fixed-length chunks of token ids, exactly as llama-imatrix makes them.

llama.cpp's compute_imatrix (tools/imatrix/imatrix.cpp) tokenizes the whole text once with
``common_tokenize(ctx, text, add_special=true, parse_special=false)`` (one BOS at the start when the vocab adds
BOS; special-token text such as ``<|im_start|>`` is split as ordinary text), keeps ``len(tokens) // n_ctx``
chunks and, for each chunk, replaces its first token by BOS when the vocab adds BOS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmquant.errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Chunks:
    """``token_ids[i]`` is chunk i as the model sees it (BOS first where the vocab adds one)."""

    token_ids: torch.Tensor  # int64 [n_chunks, n_ctx]
    targets: torch.Tensor  # int64 [n_chunks, n_ctx]: the text's own tokens, before the BOS replacement
    n_text_tokens: int
    add_bos: bool

    @property
    def n_chunks(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def n_ctx(self) -> int:
        return int(self.token_ids.shape[1])


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The model folder's Hugging Face tokenizer; a folder without one is an input error."""
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{model_dir}: no tokenizer in the model folder (expected one of "
                         f"{', '.join(TOKENIZER_FILES)}); copy the tokenizer files from the original model")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        raise InputError(f"{model_dir}: could not load the tokenizer ({type(exc).__name__}: {exc})") from None


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with special tokens puts BOS first: what llama.cpp's converter stores as add_bos_token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


def tokenize_like_llama_cpp(tokenizer: Any, text: str, add_bos: bool | None = None) -> list[int]:
    """common_tokenize(text, add_special=true, parse_special=false): special-token text is not parsed."""
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ([tokenizer.bos_token_id] if add_bos else []) + list(ids)


def make_chunks(tokens: list[int], n_ctx: int, max_chunks: int | None = None, bos_id: int | None = None) -> Chunks:
    """Cut ``tokens`` into whole chunks of ``n_ctx``; with ``bos_id``, each chunk starts with BOS.

    Fewer tokens than one chunk is an input error that says how many were found and needed.
    """
    if n_ctx < 1:
        raise InputError(f"--ctx must be at least 1 token, got {n_ctx}")
    n_available = len(tokens) // n_ctx
    if n_available < 1:
        raise InputError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}: "
                         f"give more text or a smaller --ctx")
    n_chunks = n_available if max_chunks is None else min(max_chunks, n_available)
    if n_chunks < 1:
        raise InputError(f"--chunks must be at least 1, got {max_chunks}")
    targets = torch.tensor(tokens[: n_chunks * n_ctx], dtype=torch.int64).reshape(n_chunks, n_ctx)
    token_ids = targets.clone()
    if bos_id is not None:
        token_ids[:, 0] = bos_id  # imatrix.cpp: "add BOS token for the first batch of each chunk"
    return Chunks(token_ids, targets, len(tokens), bos_id is not None)


def chunk_text(tokenizer: Any, text: str, n_ctx: int, max_chunks: int | None = None) -> Chunks:
    """Tokenize ``text`` as llama.cpp does and cut it into llama-imatrix's chunks."""
    add_bos = tokenizer_adds_bos(tokenizer)
    tokens = tokenize_like_llama_cpp(tokenizer, text, add_bos=add_bos)
    return make_chunks(tokens, n_ctx, max_chunks, tokenizer.bos_token_id if add_bos else None)
