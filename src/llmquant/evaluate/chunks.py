"""Evaluation chunks as llama-perplexity makes them.

perplexity.cpp tokenizes the whole text once (BOS first where the vocab adds one), needs at least two chunks of
``n_ctx`` tokens, keeps ``len(tokens) // n_ctx`` chunks (or ``--chunks``), puts BOS in each chunk's first position
and scores only the second half: the logits at positions ``n_ctx/2 … n_ctx-2`` predict the tokens after them,
so every scored token has at least half a context before it.
"""

from __future__ import annotations

import numpy as np

from llmquant.errors import InputError


def first_scored(n_ctx: int) -> int:
    """The first position whose logits are scored (perplexity.cpp: ``first = n_ctx/2``)."""
    return n_ctx // 2


def n_scored(n_ctx: int) -> int:
    """Scored tokens per chunk: ``n_ctx - 1 - n_ctx/2``."""
    return n_ctx - 1 - first_scored(n_ctx)


def split_into_chunks(tokens: list[int] | np.ndarray, n_ctx: int, max_chunks: int | None = None) -> np.ndarray:
    """The text's tokens as int32 ``[n_chunks, n_ctx]``; fewer than two chunks' worth is an input error."""
    if n_ctx < 4:
        raise InputError(f"--ctx must be at least 4 tokens (half of each chunk is scored), got {n_ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise InputError(f"--chunks must be at least 1, got {max_chunks}")
    n_tokens = len(tokens)
    if n_tokens < 2 * n_ctx:
        raise InputError(f"the evaluation text tokenizes to only {n_tokens} tokens; --ctx {n_ctx} needs at least "
                         f"{2 * n_ctx} (two chunks, as llama-perplexity): give more text or a smaller --ctx")
    n_chunks = n_tokens // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    return np.asarray(tokens[: n_chunks * n_ctx], dtype=np.int32).reshape(n_chunks, n_ctx)


def model_input(chunk: np.ndarray, bos_token_id: int | None) -> np.ndarray:
    """The chunk as the model sees it: BOS in the first position when the model's vocab adds BOS."""
    ids = np.array(chunk, dtype=np.int64)
    if bos_token_id is not None:
        ids[0] = bos_token_id  # perplexity.cpp: "add BOS token for the first batch of each chunk"
    return ids


def scored_targets(chunk: np.ndarray) -> np.ndarray:
    """The tokens the scored positions predict: ``chunk[n_ctx/2 + 1:]``."""
    return np.asarray(chunk[first_scored(len(chunk)) + 1:], dtype=np.int64)


__all__ = ["first_scored", "model_input", "n_scored", "scored_targets", "split_into_chunks"]
