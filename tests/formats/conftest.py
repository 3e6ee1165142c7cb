"""Real weights for format tests: tensors of the SmolLM2 fixture (bf16 values widened to float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Format tests run torch on one thread: the searches are thousands of small ops that extra threads only slow
    down (the bytes do not depend on it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2_weights(smollm2_hf: Path) -> dict[str, np.ndarray]:
    """A few real weight matrices, by Hugging Face name.

    ``mlp.down_proj`` rows are 1536 wide (a multiple of 256: true k-quants); the others are 576 wide.
    """
    names = [
        "model.layers.0.mlp.down_proj.weight",  # [576, 1536]
        "model.layers.14.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",  # [576, 576]
        "model.layers.29.mlp.gate_proj.weight",  # [1536, 576]
    ]
    out = {}
    for shard in sorted(smollm2_hf.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in names:
                if name in f.keys():
                    out[name] = f.get_tensor(name).float().numpy()
    assert set(out) == set(names), f"missing tensors in the SmolLM2 fixture: {set(names) - set(out)}"
    return out


@pytest.fixture(scope="session")
def smollm2_down_proj(smollm2_weights) -> np.ndarray:
    """A real [576, 1536] matrix: 576 rows of 6 super-blocks, for k-quants and IQ4_XS."""
    return smollm2_weights["model.layers.14.mlp.down_proj.weight"]
