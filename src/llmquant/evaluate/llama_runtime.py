"""Loading a GGUF into llama.cpp (llama-cpp-python) for inference, safely on every CPU.

ggml's AMX matrix multiply faults on some AMX machines (llama.cpp issue #20824: the tile configuration it loads is
left partly uninitialised by the compiler, and ``ldtilecfg`` raises a general-protection fault in the first
``llama_decode``). A llama-cpp-python built on an AMX CPU (ggml's native build enables it) takes that path for
every model whose weights go into the AMX buffer. Where the CPU advertises AMX we therefore load models without
ggml's extra CPU buffer types (AMX and the repacked layouts): the plain CPU kernels, the same arithmetic as a
build without AMX.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

_params_lock = threading.Lock()


@functools.cache
def cpu_has_amx() -> bool:
    """Whether /proc/cpuinfo lists the AMX int8 or bf16 extensions (False where it cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "amx_int8" in flags or "amx_bf16" in flags


def open_llama(path: str | Path, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)``, with ggml's extra CPU buffer types off on AMX CPUs."""
    import llama_cpp
    from llama_cpp import llama as llama_module

    if not cpu_has_amx():
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    # Llama() takes its model parameters from llama_model_default_params() and offers no argument for
    # use_extra_bufts, so that one call is wrapped while this model loads (under a lock: other threads may load too)
    default_params = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    with _params_lock:
        llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
        try:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            llama_module.llama_cpp.llama_model_default_params = default_params


__all__ = ["cpu_has_amx", "open_llama"]
