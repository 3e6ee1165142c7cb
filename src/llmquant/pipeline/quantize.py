"""``llmquant quantize``: a model to llama.cpp's quant mixes, one tensor at a time, no C++ needed.

The source is an F32/F16/BF16 GGUF, or a Hugging Face folder converted once (losslessly, in its own
precision) to a temporary GGUF beside the output. Each requested file type then streams that GGUF tensor by
tensor: the mix (``recipes``) picks each tensor's type, ``formats`` quantizes it with the tensor's
importance vector, and the writer puts it in place. The KV metadata is copied as llama-quantize copies it, so
the file has the same tensor types, layout and size as ``llama-quantize``'s.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from llmquant.errors import InputError
from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.gguf_io.header import GGUFHeader, HeaderTensor, read_gguf_header
from llmquant.gguf_io.writer import StreamingGGUFWriter, tensor_nbytes
from llmquant.models.demo import DEMO_MODEL_NAME, resolve_model
from llmquant.pipeline import preflight
from llmquant.pipeline.spill import SpilledBytes
from llmquant.recipes.arch import arch_info_from_metadata
from llmquant.recipes.file_types import FILE_TYPES, FileType, file_type
from llmquant.recipes.mixes import MixOptions, MixPlan, TensorSpec, plan_mix

# GGML_QNT_VERSION: written by llama-quantize into every file it makes
QUANTIZATION_VERSION = 2
# keys llama-quantize drops from the copied metadata (split bookkeeping)
_DROPPED_KEYS = ("split.no", "split.count", "split.tensors.count")
# the file types our formats can build (every tensor type of the mix must be implemented)
SOURCE_TYPES = ("F32", "F16", "BF16")


@dataclass
class QuantizeResult:
    path: Path
    file_type: str
    n_bytes: int
    n_weights: int
    tensor_bytes: int
    type_counts: dict[str, int]
    seconds: float
    imatrix: str | None  # where the importance matrix came from, or None
    fallbacks: int = 0
    unweighted: list[str] = field(default_factory=list)  # quantized tensors the imatrix had no entry for
    method: Any = None  # pipeline.calibrated.MethodResult, when a calibrated method made the linears
    recorded: dict[str, str | int] = field(default_factory=dict)  # the keys saying how the file was made
    auto: Any = None  # pipeline.sensitivity.AutoPlan, for --type auto

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_weights if self.n_weights else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "file_type": self.file_type, "bytes": self.n_bytes,
                "bits_per_weight": self.bits_per_weight, "tensor_types": self.type_counts, "seconds": self.seconds,
                "imatrix": self.imatrix, "fallbacks": self.fallbacks, "unweighted": self.unweighted,
                "method": self.method.to_json() if self.method is not None else {"method": "rtn"},
                "recorded": self.recorded,
                **({"auto": {"estimator": self.auto.estimator, "budget_bytes": self.auto.budget_bytes,
                             "predicted_bytes": self.auto.predicted_bytes}} if self.auto is not None else {})}


def supported_file_types() -> list[str]:
    """The file types ``--type`` accepts: llama.cpp's file types (``recipes.file_types``) whose default tensor type
    is registered in ``llmquant.formats``, largest first (by the default type's bits per weight, then in
    llama.cpp's order). Derived, never listed by hand: a newly registered format brings its file types along."""
    order = {name: i for i, name in enumerate(FILE_TYPES)}
    names = [name for name, ft in FILE_TYPES.items() if ft.default_type in FORMATS]
    return sorted(names, key=lambda name: (-FORMATS[FILE_TYPES[name].default_type].bits_per_weight, order[name]))


def supported_tensor_types() -> list[str]:
    """The tensor types a mix, ``--tensor-type`` or ``--output-tensor-type`` can give: every registered format,
    largest first (bits per weight, then name)."""
    return sorted(FORMATS, key=lambda name: (-FORMATS[name].bits_per_weight, name))


def parse_file_types(spec: str | Sequence[str]) -> list[FileType]:
    names = [s.strip().upper() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise InputError("--type: give at least one file type, e.g. Q4_K_M")
    supported = supported_file_types()
    out = []
    for name in names:
        if name not in supported:
            raise InputError(f"--type {name}: not supported; choose from {', '.join(supported)}")
        out.append(file_type(name))
    if len({ft.name for ft in out}) != len(out):
        raise InputError(f"--type {spec}: a file type is named twice")
    return out


# ---------------------------------------------------------------------------------------------------------
# The source: an F32/F16/BF16 GGUF
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GGUFSource:
    """The source GGUF through its header (read once, fast); tensors are read part by part when quantized."""

    path: Path
    header: GGUFHeader

    @classmethod
    def open(cls, path: Path) -> GGUFSource:
        header = read_gguf_header(path)
        for t in header.tensors:
            if t.type_name not in SOURCE_TYPES and _n_dims(t.shape) > 1:
                raise InputError(
                    f"{path}: tensor {t.name} is already quantized ({t.type_name}); give an F32, F16 or BF16 model "
                    "(requantizing a quantized file loses quality twice)"
                )
        return cls(path=Path(path), header=header)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header.metadata

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(t.name, t.shape, t.type_name) for t in self.header.tensors]

    def tensor(self, name: str) -> HeaderTensor:
        return self._by_name[name]

    def read(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Bytes ``[start, stop)`` of the tensor, read from the file (into ``out`` when given). Read, not mapped:
        mapped pages would count in the process's resident memory until the job ends, the whole model's worth."""
        return self.header.read_tensor_bytes(self._by_name[name], start, stop, out)

    @property
    def _by_name(self) -> dict[str, HeaderTensor]:
        if not hasattr(self, "_index"):
            self._index = {t.name: t for t in self.header.tensors}
        return self._index


def _n_dims(shape: Sequence[int]) -> int:
    dims = [int(d) for d in shape]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return len(dims)


def _copy_metadata(writer: StreamingGGUFWriter, source: GGUFSource, ft: FileType,
                   extra: Sequence[tuple[str, bytes | int]] = ()) -> None:
    """The input's KV pairs as llama-quantize copies them, with the quantization version and file type set, then
    ``extra`` as llama_model_quantize sets its kv_overrides: each after the rest, replacing a copied key of its
    name; strings given as bytes, counts written as u32."""
    replaced = {key for key, _ in extra}
    for key in source.metadata:
        if key == "general.architecture" or key in _DROPPED_KEYS or key in replaced:
            continue
        if key in ("general.quantization_version", "general.file_type"):
            continue
        writer.add_raw(key, source.header.raw_values[key])
    writer.writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
    writer.writer.add_uint32("general.file_type", ft.ftype)
    for key, value in extra:
        if isinstance(value, bytes):
            writer.add_string_bytes(key, value)
        else:
            writer.writer.add_uint32(key, abs(int(value)))


def _importance_for(name: str, shape: tuple[int, ...], imatrix: Mapping[str, np.ndarray] | None) -> Any:
    """The tensor's importance vector(s): one per expert for stacked MoE tensors; None when absent."""
    if imatrix is None or name not in imatrix:
        return None
    vec = np.asarray(imatrix[name], dtype=np.float32).reshape(-1)
    n_per_row = shape[0]
    n_expert = shape[2] if len(shape) > 2 else 1
    if vec.size != n_per_row * n_expert:
        if name == "token_embd.weight":  # llama.cpp ignores a mismatched token-embedding entry
            return None
        raise InputError(f"imatrix entry for {name} has {vec.size} values, the tensor needs {n_per_row * n_expert}")
    return vec.reshape(n_expert, n_per_row)


# a tensor is quantized in parts of about this many weights: big enough that the per-call costs vanish, small
# enough that the workers share even one big tensor and the parts in flight stay small
PART_WEIGHTS = 1 << 21
# parts queued per worker ahead of the one being written. Parts differ in cost (SmolLM2's Q6_K: each layer's
# ffn_down is a slow Q6_K part among six fast Q8_0 ones), so a short queue leaves one worker idle while the other
# finishes the slow part; 8 lets a worker run a layer or two ahead. Memory: at most this many finished parts
# (a few MB each) wait to be written, and at most MAX_PARTS_AHEAD in all once there are many workers (but never
# fewer than two per worker).
PARTS_AHEAD_PER_WORKER = 8
MAX_PARTS_AHEAD = 64


@dataclass(frozen=True)
class _Part:
    """Rows [start, stop) of one tensor (of one expert's matrix when ``importance`` is per expert)."""

    name: str
    start: int
    stop: int
    n_per_row: int
    src_type: str
    type_name: str
    importance: np.ndarray | None

    @property
    def n_weights(self) -> int:
        return (self.stop - self.start) * self.n_per_row


def _parts(name: str, shape: tuple[int, ...], src_type: str, type_name: str,
           importance: np.ndarray | None) -> list[_Part]:
    """The tensor's rows in parts of about PART_WEIGHTS weights, none crossing from one expert to the next (each
    takes its expert's importance vector, as llama.cpp slices it)."""
    n_per_row = int(shape[0])
    rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    n_matrices = importance.shape[0] if importance is not None else 1
    rows_per_matrix = rows // n_matrices
    step = max(1, PART_WEIGHTS // n_per_row)
    parts = []
    for e in range(n_matrices):
        vector = None if importance is None else importance[e]
        first = e * rows_per_matrix
        for start in range(first, first + rows_per_matrix, step):
            stop = min(start + step, first + rows_per_matrix)
            parts.append(_Part(name, start, stop, n_per_row, src_type, type_name, vector))
    return parts


def _byte_range(part: _Part) -> tuple[int, int]:
    row_bytes = part.n_per_row * FORMATS[part.src_type].bytes_per_block
    return part.start * row_bytes, part.stop * row_bytes


# each worker thread reads its parts into one buffer of its own, reused: fresh multi-MB arrays would cost a page
# fault per 4 KiB every time
_buffers = threading.local()


def _read_buffer(n_bytes: int) -> np.ndarray:
    buffer = getattr(_buffers, "data", None)
    if buffer is None or buffer.size < n_bytes:
        buffer = _buffers.data = np.empty(n_bytes, dtype=np.uint8)
    return buffer


def _encode_part(source: GGUFSource, part: _Part, device: torch.device) -> np.ndarray:
    """One part's rows of the source tensor → the bytes of ``part.type_name``."""
    start, stop = _byte_range(part)
    raw = source.read(part.name, start, stop, out=_read_buffer(stop - start))
    values = dequantize(raw, part.src_type, (part.stop - part.start, part.n_per_row))
    try:
        data = quantize(torch.from_numpy(values).to(device), part.type_name, imatrix=part.importance)
    except ValueError:  # non-finite weights: name the tensor, the count and the first position
        preflight.check_finite(f"{part.name} in {source.path}", values, first_row=part.start)
        raise
    # the buffer is reused by the worker's next part: an output that is a view of it (F32 from F32) is copied
    return data.copy() if np.may_share_memory(data, raw) else data


def _given_part(_source: GGUFSource, _part: _Part, data: np.ndarray) -> np.ndarray:
    return data


def _copy_part(source: GGUFSource, part: _Part) -> np.ndarray:
    """One part of a tensor kept in its type: its bytes as they are."""
    return source.read(part.name, *_byte_range(part))


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep up to 256 MiB of freed memory per heap and to serve blocks up to 64 MiB from it,
    once per process; False where the C library is not glibc. By default a freed block of a few MB goes back to
    the system at once, and the next part's temporaries of the same size fault their pages in again, one per
    4 KiB: 20-25% of a SmolLM2 job. The memory kept is what the job's peak used anyway."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 64 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def _set_torch_threads_to_one() -> None:
    # OpenMP's thread count is per thread: each worker sets its own
    torch.set_num_threads(1)


def plan_file_type(source: GGUFSource, ft: FileType, options: MixOptions | None = None,
                   has_imatrix: bool = False) -> MixPlan:
    """Each tensor's type in file type ``ft`` (llama.cpp's mix for this model)."""
    options = MixOptions(**{**(options or MixOptions()).__dict__, "has_imatrix": has_imatrix})
    return plan_mix(source.specs(), arch_info_from_metadata(source.metadata), ft, options)


def quantize_gguf(
    source: GGUFSource,
    output: Path,
    ft: FileType,
    imatrix: Mapping[str, np.ndarray] | None = None,
    imatrix_name: str | None = None,
    options: MixOptions | None = None,
    device: str = "cpu",
    progress: bool = False,
    threads: int | None = None,
    tensors: Mapping[str, np.ndarray] | None = None,
    plan: MixPlan | None = None,
    metadata: Sequence[tuple[str, bytes | int]] = (),
) -> QuantizeResult:
    """Write ``source`` as file type ``ft`` to ``output`` (under a temporary name until complete).

    ``tensors``: GGUF name -> bytes already made for the file (by a calibrated method), written as they are in
    place of quantizing the source's tensor; ``plan``: the mix, when the caller has already planned it;
    ``metadata``: keys set after the copied ones, as llama-quantize's kv overrides (``quantize.imatrix.*``)."""
    start = time.perf_counter()
    plan = plan or plan_file_type(source, ft, options, has_imatrix=imatrix is not None)
    tensors = tensors or {}
    if plan.needs_imatrix and imatrix is None:
        raise InputError(
            f"{ft.name} needs an importance matrix for {len(plan.needs_imatrix)} tensors (e.g. "
            f"{plan.needs_imatrix[0]}): give --imatrix FILE or --calib TEXT"
        )
    missing = [t for t in plan.types.values() if t not in FORMATS]
    if missing:
        raise InputError(f"{ft.name}: tensor type {missing[0]} is not implemented in llmquant.formats yet")
    dev = torch.device(device)
    # One worker thread per core, each quantizing whole parts. ggml's searches run as numba code that releases the
    # GIL (nogil), so the workers run in parallel; the small torch steps around them (reconstruct, pack) run
    # single-threaded in each worker, as torch's own intra-op threads would only compete with the other workers.
    # On CUDA too: the searches run on the CPU whatever the device (formats.base), so one worker would leave every
    # core but one idle.
    n_workers = threads or os.cpu_count() or 1
    if dev.type == "cpu":
        keep_freed_memory()
    arch = str(source.metadata["general.architecture"])
    unweighted: list[str] = []
    n_weights = sum(source.tensor(name).n_elements for name in plan.types)
    tensor_bytes = 0
    with (StreamingGGUFWriter(output, arch) as writer,
          ThreadPoolExecutor(max_workers=n_workers, initializer=_set_torch_threads_to_one) as pool):
        for name, type_name in plan.types.items():
            numpy_shape = tuple(reversed(source.tensor(name).shape))
            writer.declare(name, numpy_shape, GGMLQuantizationType[type_name])
        _copy_metadata(writer, source, ft, metadata)
        writer.begin()
        bar = _progress_bar(n_weights, ft.name, progress)
        # parts are quantized in order by the workers, a bounded number ahead of the one being written
        parts_ahead = max(2 * n_workers, min(PARTS_AHEAD_PER_WORKER * n_workers, MAX_PARTS_AHEAD))
        in_flight: deque[tuple[str, int, Future]] = deque()

        def write_oldest() -> None:
            nonlocal tensor_bytes
            part_name, part_weights, future = in_flight.popleft()
            data = future.result()
            writer.write(part_name, data)
            tensor_bytes += data.nbytes
            bar.set_postfix_str(part_name, refresh=False)
            bar.update(part_weights)

        def submit(part: _Part, job: Callable[..., np.ndarray], *args: Any) -> None:
            in_flight.append((part.name, part.n_weights, pool.submit(job, source, part, *args)))
            while len(in_flight) > parts_ahead:  # per part: one huge tensor's parts do not pile up either
                write_oldest()

        try:
            for name, type_name in plan.types.items():
                t = source.tensor(name)
                if name in tensors:
                    given = tensors[name]
                    if given.nbytes != tensor_nbytes(tuple(reversed(t.shape)), GGMLQuantizationType[type_name]):
                        raise RuntimeError(f"{name}: {given.nbytes} bytes made for {type_name}, the file needs more")
                    submit(_Part(name, 0, int(np.prod(t.shape[1:])), int(t.shape[0]), t.type_name, type_name, None),
                           _given_part, given)
                elif type_name == t.type_name:  # kept as it is: copied byte for byte
                    for part in _parts(name, t.shape, t.type_name, type_name, None):
                        submit(part, _copy_part)
                else:
                    importance = _importance_for(name, t.shape, imatrix)
                    if imatrix is not None and importance is None and FORMATS[type_name].block_size > 1:
                        unweighted.append(name)
                    for part in _parts(name, t.shape, t.type_name, type_name, importance):
                        submit(part, _encode_part, dev)
            while in_flight:
                write_oldest()
        except BaseException:
            for _, _, future in in_flight:
                future.cancel()
            raise
        finally:
            bar.close()
        path = writer.finish()
    return QuantizeResult(
        path=path,
        file_type=ft.name,
        n_bytes=path.stat().st_size,
        n_weights=n_weights,
        tensor_bytes=tensor_bytes,
        type_counts=dict(Counter(plan.types.values()).most_common()),
        seconds=time.perf_counter() - start,
        imatrix=imatrix_name,
        fallbacks=len(plan.fallbacks),
        unweighted=unweighted,
        recorded={key: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                  for key, value in metadata},
    )


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="weight", unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------------------


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _lossless_outtype(folder: Path) -> str:
    """The GGUF type that holds the folder's weights exactly: their own dtype."""
    import json

    try:
        dtype = str(json.loads((folder / "config.json").read_text()).get("torch_dtype")
                    or json.loads((folder / "config.json").read_text()).get("dtype") or "float32")
    except (OSError, ValueError):
        return "f32"
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype.replace("torch.", ""), "f32")


def quantize_model(
    model: str | os.PathLike,
    output: str | os.PathLike,
    types: str | Sequence[str],
    imatrix_file: str | os.PathLike | None = None,
    calib: Sequence[str] | None = None,
    options: MixOptions | None = None,
    device: str = "cpu",
    threads: int | None = None,
    calib_chunks: int | None = 100,
    calib_ctx: int = 512,
    progress: bool = False,
    log: Callable[[str], None] = lambda _msg: None,
    allow_pickle: bool = False,
    method: str = "rtn",
    damp: float = 0.01,
    act_order: bool = False,
    auto: Any = None,
) -> list[QuantizeResult]:
    """Quantize ``model`` to each file type in ``types``; one conversion and one imatrix serve them all.

    ``method``: ``rtn`` (llama-quantize's bytes), or ``gptq``, ``awq``, ``awq+gptq`` (``pipeline.calibrated``:
    the decoder layers' linears calibrated layer by layer on ``calib``, a Hugging Face folder needed).
    ``auto``: a ``pipeline.sensitivity.AutoRequest`` when ``types`` is ``auto`` (a mix chosen for a size budget)."""
    from llmquant.pipeline.calibrated import parse_method

    is_auto = isinstance(types, str) and types.strip().lower() == "auto"
    if is_auto and auto is None:
        raise InputError("--type auto needs a budget: give --target-size SIZE or --target-bpw BITS")
    if is_auto and options is not None and options != MixOptions():
        raise InputError("--type auto chooses every tensor's type itself: --pure, --tensor-type, --output-tensor-type, "
                         "--token-embedding-type and --leave-output-tensor do not apply to it")
    file_types = [] if is_auto else parse_file_types(types)
    method = parse_method(method)
    if method != "rtn" and not calib:
        raise InputError(f"--method {method} calibrates on text: give --calib TEXT (e.g. --calib builtin)")
    if imatrix_file and calib:
        raise InputError("give either --imatrix or --calib, not both")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    as_folder = preflight.wants_folder(output)  # before Path() drops a trailing "/"
    output = Path(output)
    if len(file_types) > 1 and output.suffix.lower() == ".gguf":
        raise InputError(f"{output}: several types need an output folder, not a .gguf file")
    model_path = resolve_model(model) if str(model) == DEMO_MODEL_NAME else Path(model).expanduser()
    if not model_path.exists():
        raise InputError(f"{model_path}: no such file or folder (or use the built-in demo model '{DEMO_MODEL_NAME}')")
    if is_auto:  # one file, its type known once the mix is chosen
        targets = {"auto": output / f"{_output_stem(model, model_path)}-auto.gguf" if as_folder else output}
    else:
        targets = _output_paths(output, as_folder, file_types, model, model_path)
    preflight.check_quantize(model_path, list(targets.values()), imatrix_file, calib or (), calib_ctx, calib_chunks,
                             allow_pickle)

    imatrix: dict[str, np.ndarray] | None = None
    imatrix_name: str | None = None
    provenance: Any = None  # gguf_io.imatrix.ImatrixProvenance: the quantize.imatrix.* keys
    if imatrix_file:
        from llmquant.gguf_io.imatrix import importance_vectors, provenance_of_file, read_imatrix

        path = Path(imatrix_file)
        if not path.is_file():
            raise InputError(f"{path}: no such imatrix file")
        data = read_imatrix(path)
        # the path as given, as llama-quantize records it (a Path's str normalises "./x" to "x")
        imatrix, provenance = importance_vectors(data), provenance_of_file(str(imatrix_file), data)
        imatrix_name = f"{imatrix_file} ({provenance.describe(data.chunk_size)})"

    # scratch space (the converted source, an on-the-fly imatrix) beside the outputs, not in a small /tmp
    scratch_parent = next(iter(targets.values())).parent
    scratch_parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".llmquant-", dir=scratch_parent))
    try:
        if _is_gguf(model_path):
            source_path = model_path
            if calib:
                raise InputError("--calib (and every --method but rtn) needs a Hugging Face model folder to run; "
                                 "for a GGUF give --imatrix FILE")
        elif model_path.is_dir():
            from llmquant.pipeline.convert import convert_model

            outtype = _lossless_outtype(model_path)
            log(f"converting {model_path} to a temporary {outtype.upper()} GGUF")
            source_path = workdir / "source.gguf"
            convert_model(model_path, source_path, outtype=outtype, progress=progress, allow_pickle=allow_pickle)
            # a method gathers the importance vectors itself, layer by layer: the whole model is never in memory
            if calib and method == "rtn":
                from llmquant.pipeline.imatrix import run_imatrix

                log(f"computing the importance matrix from {', '.join(calib)}")
                run = run_imatrix(model_path, list(calib), output=workdir / "imatrix.gguf", n_ctx=calib_ctx,
                                  allow_pickle=allow_pickle,
                                  n_chunks=calib_chunks, device=device, progress=progress)
                from llmquant.gguf_io.imatrix import importance_vectors, provenance_of_calibration

                imatrix = importance_vectors(run.data)
                provenance = provenance_of_calibration(run.data.datasets, len(run.data.entries), run.n_chunks)
                imatrix_name = f"computed from {', '.join(calib)} ({provenance.describe(calib_ctx)})"
        else:
            raise InputError(f"{model_path}: not a GGUF file or a Hugging Face model folder")

        source = GGUFSource.open(source_path)
        src_types = {t.type_name for t in source.header.tensors}
        if src_types - set(SOURCE_TYPES):
            raise InputError(f"{source_path}: holds {sorted(src_types - set(SOURCE_TYPES))} tensors; "
                             "give an F32, F16 or BF16 model")
        # the calibration chunks, tokenized once for every file type's method run
        token_ids, calib_names = None, []
        if method != "rtn":
            token_ids, calib_names = _calibration_tokens(model_path, calib, calib_ctx, calib_chunks)
        auto_plans = {}
        if is_auto:  # the automatic mix, then written like any other file type's plan
            from llmquant.pipeline.sensitivity import plan_auto

            made_auto = plan_auto(auto, source, model_path if model_path.is_dir() else None, imatrix, calib,
                                  calib_ctx, has_imatrix=imatrix is not None or bool(calib), device=device,
                                  threads=threads, progress=progress, log=log)
            file_types = [made_auto.plan.file_type]
            auto_plans[made_auto.plan.file_type.name] = made_auto
            targets = {made_auto.plan.file_type.name: targets["auto"]}
        results = []
        for ft in file_types:
            target = targets[ft.name]
            plan = auto_plans[ft.name].plan if ft.name in auto_plans else \
                plan_file_type(source, ft, options, has_imatrix=imatrix is not None or method != "rtn")
            made = None
            ft_imatrix, ft_imatrix_name = imatrix, imatrix_name
            metadata = provenance.metadata() if provenance is not None else []
            # a method's bytes wait in a scratch file, not in memory, until the file is written
            store = SpilledBytes(workdir / f"{ft.name}.tensors") if method != "rtn" else None
            try:
                if store is not None:
                    from llmquant.gguf_io.imatrix import provenance_of_calibration
                    from llmquant.pipeline.calibrated import METHOD_KEY, describe_method, quantize_with_method

                    log(f"{ft.name}: {method} on {', '.join(calib)}, layer by layer")
                    made = quantize_with_method(model_path, method, plan.types, token_ids, device=device,
                                                damp=damp, act_order=act_order, progress=progress, store=store,
                                                allow_pickle=allow_pickle)
                    gathered = provenance_of_calibration(calib_names, len(made.importance), int(token_ids.shape[0]))
                    ft_imatrix = made.importance
                    ft_imatrix_name = (f"gathered by {method} from {', '.join(calib)} "
                                       f"({gathered.describe(calib_ctx)})")
                    metadata = [*gathered.metadata(), (METHOD_KEY, describe_method(method, damp, act_order).encode())]
                result = quantize_gguf(source, target, ft, imatrix=ft_imatrix, imatrix_name=ft_imatrix_name,
                                       options=options, device=device, progress=progress, threads=threads,
                                       tensors=made.tensors if made else None, plan=plan, metadata=metadata)
            finally:
                if store is not None:
                    store.close()
            result.method = made
            result.auto = auto_plans.get(ft.name)
            results.append(result)
        return results
    except OSError as exc:  # a disk that filled up mid-job: one line naming the output
        raise preflight.os_error(exc, output) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _calibration_tokens(folder: Path, calib: Sequence[str], n_ctx: int,
                        n_chunks: int | None) -> tuple[torch.Tensor, list[str]]:
    """The calibration chunks' token ids ``[n_chunks, n_ctx]`` and the sources' names (as an imatrix records them)."""
    from llmquant.calibration.chunking import chunk_text, load_tokenizer
    from llmquant.calibration.sources import join_sources, load_text_sources

    sources = load_text_sources(list(calib))
    chunks = chunk_text(load_tokenizer(folder), join_sources(sources), n_ctx, n_chunks)
    return chunks.token_ids, [source.name for source in sources]


def _output_paths(output: Path, as_folder: bool, file_types: Sequence[FileType], model: str | os.PathLike,
                  model_path: Path) -> dict[str, Path]:
    """Each file type's output file: ``output`` for one type, else (or when ``output`` names a folder) one file
    per type inside it, named for the model and the type."""
    if len(file_types) == 1 and not as_folder:
        return {file_types[0].name: output}
    return {ft.name: output / f"{_output_stem(model, model_path)}-{ft.name}.gguf" for ft in file_types}


def _output_stem(model: str | os.PathLike, model_path: Path) -> str:
    """``smollm2-135m``, ``Llama-3.2-1B`` (folder name) or ``model`` (``model-f16.gguf`` without its type)."""
    if str(model) == DEMO_MODEL_NAME:
        return DEMO_MODEL_NAME
    stem = model_path.name if model_path.is_dir() else model_path.stem
    for suffix in ("-f32", "-f16", "-bf16", "-F32", "-F16", "-BF16"):
        stem = stem.removesuffix(suffix)
    return stem


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def results_json(results: Sequence[QuantizeResult]) -> str:
    import json

    return json.dumps([r.to_json() for r in results], indent=2)


def format_results(results: Sequence[QuantizeResult], verbose: bool = False) -> str:
    from llmquant.pipeline.inspect import human_bytes

    lines = []
    for r in results:
        types = ", ".join(f"{n} {t}" for t, n in r.type_counts.items())
        lines.append(f"{r.path}: {r.file_type}, {human_bytes(r.n_bytes)}, {r.bits_per_weight:.3f} bits per weight, "
                     f"{r.seconds:.1f} s")
        lines.append(f"  tensors: {types}")
        if r.auto is not None:
            lines.append(f"  auto mix from {r.auto.estimator} sensitivities: predicted {r.auto.predicted_bytes:,} "
                         f"bytes, actual {r.n_bytes:,}, budget {r.auto.budget_bytes:,}; "
                         f"general.file_type {r.file_type} "
                         "(the llama.cpp mix nearest in size)")
        if r.fallbacks:
            lines.append(f"  {_count(r.fallbacks, 'tensor')} used a fallback type (rows not a multiple of the block "
                         "size)")
        if r.method is not None:
            m = r.method
            gain = f"; output error on the calibration text {m.proxy_error / m.proxy_error_rtn:.2f}x plain " \
                   "rounding's" if m.proxy_error_rtn > 0 else ""
            lines.append(f"  method: {m.method} on {len(m.tensors)} tensors, {m.n_tokens} calibration tokens, "
                         f"{m.seconds:.1f} s{gain}")
            if m.plain:
                lines.append(f"  {_count(len(m.plain), 'tensor')} not reached by {m.method}, rounded plainly "
                             f"(e.g. {m.plain[0]})")
            if m.not_gptq:
                lines.append(f"  {_count(len(m.not_gptq), 'tensor')} of codeword types (IQ1-IQ3) rounded without GPTQ, "
                             f"which rounds one column at a time (e.g. {m.not_gptq[0]})")
            if m.idle_experts:
                lines.append(f"  {_count(len(m.idle_experts), 'expert')} got no calibration token, rounded plainly "
                             f"(e.g. {m.idle_experts[0]})")
            if verbose:
                for i, (error, error_rtn) in enumerate(m.layer_errors):
                    ratio = f"{error / error_rtn:.3f}x plain rounding's" if error_rtn > 0 else "no error"
                    lines.append(f"    layer {i}: output error {error:.4g}, {ratio}")
        if r.imatrix:
            lines.append(f"  importance matrix: {r.imatrix}")
            if r.unweighted:
                lines.append(f"  {_count(len(r.unweighted), 'tensor')} had no imatrix entry (e.g. {r.unweighted[0]})")
        else:
            lines.append("  no importance matrix: quantized without one (give --imatrix or --calib for better quality)")
    return "\n".join(lines)
