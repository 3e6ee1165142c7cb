"""A fused kernel as a shared library: ``torch.export`` traces it, AOTInductor compiles it to C++ and a ``.so``,
and ``Library`` calls that through its C interface with ctypes.

Why not ``torch.compile``: calling a compiled function needs dynamo and inductor imported (~2.5 s per process,
as long as llama.cpp takes to quantize a 135M model), and torch's own AOTInductor runners hold the GIL while the
kernel runs, so the pipeline's worker threads would take turns. ctypes drops the GIL for the call and needs only
``torch._C``: a new process loads a kernel in about a millisecond.

The library checks nothing about its inputs (a wrong width runs and reads out of bounds), so ``Library.accepts``
does, from the spec that ``build`` records: each input's dtype and sizes (a number, or the name of a size the
export left symbolic, one value per name within its range). Inputs must be contiguous CPU tensors.
"""

from __future__ import annotations

import ctypes
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

# model instances per loaded kernel: worker threads calling one kernel at once each get one
_INSTANCES = max(1, min(os.cpu_count() or 1, 64))

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class Library:
    """A kernel library loaded for calling: ``library(tensors)`` returns what the kernel returns (a tensor, or a
    tuple whose None entries stay None)."""

    def __init__(self, path: Path, spec: dict) -> None:
        self.inputs = [(getattr(torch, dtype), tuple(dims)) for dtype, dims in spec["inputs"]]
        self.ranges = [(symbol, low, high) for symbol, (low, high) in spec["ranges"].items()]
        self.single = bool(spec["single"])  # one tensor, not a tuple
        self._lib = ctypes.CDLL(str(path))
        create = self._lib.AOTInductorModelContainerCreateWithDevice
        create.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p]
        self._container = ctypes.c_void_p()
        _check(create(ctypes.byref(self._container), _INSTANCES, b"cpu", None), "create")
        self.n_outputs = self._count("AOTInductorModelContainerGetNumOutputs")
        if self._count("AOTInductorModelContainerGetNumInputs") != len(self.inputs):
            raise RuntimeError(f"{path.name}: the library's inputs do not match its spec")
        self._run = self._lib.AOTInductorModelContainerRun
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                              ctypes.c_void_p, ctypes.c_void_p]

    def _count(self, getter: str) -> int:
        count = ctypes.c_size_t()
        function = getattr(self._lib, getter)
        function.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        _check(function(self._container, ctypes.byref(count)), getter)
        return count.value

    def accepts(self, tensors: tuple) -> bool:
        """Whether these inputs are ones the library was compiled for."""
        if len(tensors) != len(self.inputs):
            return False
        sizes: dict[str, int] = {}
        for tensor, (dtype, dims) in zip(tensors, self.inputs, strict=True):
            if tensor.dtype != dtype or tensor.dim() != len(dims) or tensor.device.type != "cpu":
                return False
            for size, dim in zip(tensor.shape, dims, strict=True):
                if size != (dim if type(dim) is int else sizes.setdefault(dim, size)):
                    return False
        return all(low <= sizes.get(symbol, low - 1) and (high is None or sizes[symbol] <= high)
                   for symbol, low, high in self.ranges)

    def __call__(self, tensors: tuple):
        """Run on contiguous inputs that ``accepts``; the GIL is released while the kernel runs."""
        handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(list(tensors))  # new references, stolen
        inputs = (ctypes.c_void_p * len(handles))(*(_capsule_pointer(handle, None) for handle in handles))
        outputs = (ctypes.c_void_p * self.n_outputs)()
        _check(self._run(self._container, inputs, len(handles), outputs, self.n_outputs, None, None), "run")
        stolen = iter(torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [_new_capsule(pointer, None, None) for pointer in outputs if pointer]))
        results = tuple(None if pointer is None else next(stolen) for pointer in outputs)
        return results[0] if self.single else results


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"AOTInductor kernel: {what} failed (code {code})")


class _Call(torch.nn.Module):
    def __init__(self, fn: Callable, constants: tuple) -> None:
        super().__init__()
        self.fn = fn
        self.constants = constants

    def forward(self, *tensors: torch.Tensor):
        return self.fn(*tensors, *self.constants)


def build(fn: Callable, constants: tuple, tensors: tuple, scratch: Path) -> tuple[Path, dict]:
    """Compile ``fn(*tensors, *constants)`` for inputs like ``tensors`` (every size symbolic unless the code
    specializes it) into a library in the folder ``scratch``; returns its path and its spec."""
    import torch._inductor
    from torch.export import Dim

    call = _Call(fn, constants)
    dynamic = tuple({i: Dim.AUTO for i in range(tensor.dim())} for tensor in tensors)
    # export logs a warning for each size of 1 it specializes (a broadcast row, expected): not the user's concern
    export_log = logging.getLogger("torch._export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        program = torch.export.export(call, tensors, dynamic_shapes=(dynamic,), strict=False)
        spec = _input_spec(program)
        if spec is None:  # a size the code ties to another by a formula: compile for these sizes only
            program = torch.export.export(call, tensors, strict=False)
            spec = _input_spec(program)
    finally:
        export_log.setLevel(level)
    spec["single"] = program.call_spec.out_spec.is_leaf()
    package = scratch / "kernel.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    with zipfile.ZipFile(package) as archive:
        libraries = [name for name in archive.namelist() if name.endswith(".so")]
        if len(libraries) != 1:
            raise RuntimeError(f"AOTInductor package with {len(libraries)} libraries; expected one")
        library = scratch / "kernel.so"
        library.write_bytes(archive.read(libraries[0]))
    return library, spec


def _input_spec(program) -> dict | None:
    """Each input's dtype and sizes (a number, or a symbol's name) and each symbol's range (no upper bound:
    None), or None when a size is a formula of symbols."""
    inputs = []
    for node in program.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta["val"]
        dims: list[int | str] = []
        for size in value.shape:
            expression = str(size.node.expr) if isinstance(size, torch.SymInt) else str(size)
            if not (expression.isdigit() or expression.isidentifier()):
                return None
            dims.append(int(expression) if expression.isdigit() else expression)
        inputs.append((str(value.dtype).removeprefix("torch."), dims))
    ranges = {str(symbol): (int(values.lower), None if str(values.upper) in ("int_oo", "oo") else int(values.upper))
              for symbol, values in program.range_constraints.items()}
    return {"inputs": inputs, "ranges": ranges}


__all__ = ["Library", "build"]
