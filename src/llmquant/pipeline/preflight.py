"""What every job checks before it works, so that a mistake costs a second and one line, never the source.

Each command's pipeline function calls these at its start, before any model is loaded or converted:

* the inputs exist and can be read; a model folder's weights follow the one pickle rule (``check_model_folder``);
  calibration files exist (``check_text_files``) and hold at least one chunk (``check_calibration_length``);
  an importance matrix fits the model's tensors and widths (``check_imatrix``);
* each output is not one of the inputs (the same path, or the same file through a link: device and inode), its
  folder exists or can be created and takes a small write (``check_output``, ``check_output_folder``), and it
  fits in the free space and the process's file-size limit where its size is known (``check_room``).

``-o`` ending in ``/`` or naming an existing folder means "into this folder" (``output_file``). While the job
runs, ``writing`` turns an OSError into one line naming the output, and ``written_atomically`` gives a temporary
name beside the output that becomes the output only when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmquant.errors import InputError, OutputError, os_error_line

# bytes written (and removed) to learn that a folder takes writes: catches a read-only folder, a full disk and a
# tiny file-size limit before the job starts
PROBE_BYTES = 4096
# calibration specs that name no file
_NAMED_TEXTS = ("builtin", "heldout")


# ---- outputs -----------------------------------------------------------------------------------------------------


def wants_folder(output: str | os.PathLike) -> bool:
    """``-o`` names a folder: it ends in ``/`` or is an existing folder."""
    text = os.fspath(output)
    return text.endswith(("/", os.sep)) or Path(text).expanduser().is_dir()


def output_file(output: str | os.PathLike, default_name: str) -> Path:
    """The file a one-file job writes: ``output``, or ``default_name`` inside it when it names a folder."""
    path = Path(output).expanduser()
    return path / default_name if wants_folder(output) else path


def check_output(path: Path, inputs: Iterable[Path] = (), n_bytes: int = 0) -> None:
    """``path`` can be written: not a folder, not one of ``inputs``, in a folder that exists (or can be made) and
    takes writes, with room for ``n_bytes`` when that is known."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    check_not_input(path, inputs)
    folder = _existing_folder(path.parent)
    _probe(folder)
    if n_bytes:
        check_room(path, n_bytes)


def check_output_folder(folder: Path, names: Iterable[str] = (), inputs: Iterable[Path] = ()) -> None:
    """``folder`` can hold the job's files ``names``: it is a folder or can be made, takes writes, and none of
    the files it will hold is an input."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; -o names the folder to write into")
    inputs = list(inputs)
    for name in names:
        check_not_input(folder / name, inputs)
    _probe(_existing_folder(folder))


def check_not_input(output: Path, inputs: Iterable[Path]) -> None:
    """Refuse to write over an input: the same path, or the same file through a symbolic or hard link."""
    try:
        written = os.stat(output)
    except OSError:
        return  # nothing there yet, so it is no input
    for source in inputs:
        for file in _files_of(Path(source)):
            try:
                same = os.path.samestat(written, os.stat(file))
            except OSError:
                continue
            if same:
                shown = f"the input {file}" if Path(file) != Path(output) else "the input"
                raise OutputError(f"{output}: is {shown} itself; writing it would destroy the source, so choose "
                                  "another output (-o)")


def check_room(path: Path, n_bytes: int, what: str = "") -> None:
    """A file of ``n_bytes`` fits in the free space of ``path``'s file system (``path``: the file to be, or the
    folder it goes into) and under the process's file-size limit. ``what``: the file, when not ``path`` itself."""
    path = Path(path)
    folder = _existing_folder(path if path.is_dir() else path.parent)
    free = shutil.disk_usage(folder).free
    needs = f"{what} needs" if what else "needs"
    if n_bytes > free:
        raise OutputError(f"{path}: {needs} {_size(n_bytes)} but only {_size(free)} are free on its disk; free some "
                          "space or write elsewhere (-o)")
    limit = _file_size_limit()
    if limit is not None and n_bytes > limit:
        raise OutputError(f"{path}: {needs} {_size(n_bytes)} but this process may write files of at most "
                          f"{_size(limit)} (ulimit -f); raise the limit or write elsewhere (-o)")


def os_error(exc: OSError, output: str | os.PathLike) -> InputError | OutputError:
    """An OSError met while a job writes ``output``, as one line: naming the input file when the error names
    one elsewhere (it was reading), else ``output`` (a write names no file: a full disk, a file-size limit)."""
    where = Path(output)
    named = Path(os.fsdecode(exc.filename)) if isinstance(exc.filename, (str, bytes, os.PathLike)) else None
    if named is None or named == where or where in named.parents or _is_temporary(named, where):
        return OutputError(os_error_line(exc, where))
    return InputError(os_error_line(exc, named))


def _is_temporary(path: Path, output: Path) -> bool:
    """One of the job's temporary files beside ``output`` (``.out.gguf.*.partial``, ``.llmquant-*/``)."""
    return any(part.startswith((".llmquant-", f".{output.name}.")) for part in path.parts)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """An OSError inside the block as one line naming ``path`` (or the input file the error names)."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, path) from None


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; it becomes ``path`` when the block ends, and is removed if
    the block fails, so ``path`` is complete or untouched."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        temporary = Path(name)
        try:
            yield temporary
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)  # mkstemp made it private; the finished file is an ordinary one
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def _existing_folder(folder: Path) -> Path:
    """The nearest folder of ``folder`` and its parents that exists (the rest the job creates); a file there is
    an error."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{folder}: is a file, not a folder; choose another output path (-o)")
    return folder


def _probe(folder: Path) -> None:
    """Write PROBE_BYTES into a temporary file in ``folder`` and remove it: a read-only folder, a full disk or a
    tiny file-size limit show now, as one line, not after the job's work."""
    try:
        fd, name = tempfile.mkstemp(prefix=".llmquant-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(os_error_line(exc, folder)) from None
    try:
        data = memoryview(bytes(PROBE_BYTES))
        while data:  # os.write may write part of it (up to a file-size limit), then fail on the rest
            data = data[os.write(fd, data):]
    except OSError as exc:
        raise OutputError(os_error_line(exc, folder)) from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _size(n_bytes: float) -> str:
    from llmquant.pipeline.inspect import human_bytes

    return human_bytes(n_bytes)


# ---- inputs ------------------------------------------------------------------------------------------------------


def check_inputs(paths: Iterable[Path]) -> None:
    """Every path exists and can be read (a folder: listed)."""
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise InputError(f"{path}: cannot be read (permission denied); check its permissions")


def check_model_folder(folder: Path, allow_pickle: bool = False) -> Any:
    """A Hugging Face folder's config.json and weights, read as far as their headers, under the one pickle rule:
    pickled .bin weights only with ``allow_pickle``, and then only plain tensors (torch's weights_only loader).
    Returns the folder's ``models.safetensors_io.WeightSource``."""
    from llmquant.models.config import read_config
    from llmquant.models.safetensors_io import open_weights

    check_inputs([folder])
    read_config(folder)
    return open_weights(folder, allow_pickle=allow_pickle)


def check_text_files(specs: Sequence[str]) -> None:
    """Every calibration or evaluation text that names a file exists and is a file."""
    from llmquant.calibration.builtin import BUILTIN_NAME, HELDOUT_NAME
    from llmquant.calibration.sources import DATASET_PREFIX

    for spec in specs:
        if spec in (*_NAMED_TEXTS, BUILTIN_NAME, HELDOUT_NAME) or spec.startswith(DATASET_PREFIX):
            continue
        path = Path(spec).expanduser()
        if not path.is_file():
            hint = " (a folder: give the text files inside it)" if path.is_dir() else ""
            raise InputError(f"{path}: no such text file{hint}; check the path")
        check_inputs([path])


def check_calibration_length(folder: Path, specs: Sequence[str], n_ctx: int, ctx_option: str = "--ctx") -> None:
    """The calibration text holds at least one chunk of ``n_ctx`` tokens, as ``calibration.chunking`` will cut it;
    counted on a prefix when that is enough, so a long text costs little."""
    from llmquant.calibration.chunking import load_tokenizer, tokenize_like_llama_cpp, tokenizer_adds_bos
    from llmquant.calibration.sources import join_sources, load_text_sources

    if n_ctx < 1:
        raise InputError(f"{ctx_option} must be at least 1 token, got {n_ctx}")
    tokenizer = load_tokenizer(folder)
    text = join_sources(load_text_sources(list(specs)))
    add_bos = tokenizer_adds_bos(tokenizer)
    prefix = text[: 64 * n_ctx]  # a token spans far fewer than 64 characters
    n_tokens = len(tokenize_like_llama_cpp(tokenizer, prefix, add_bos=add_bos))
    if n_tokens <= n_ctx and len(prefix) < len(text):  # the cut may split a word: one token fewer in the whole
        n_tokens = len(tokenize_like_llama_cpp(tokenizer, text, add_bos=add_bos))
    if n_tokens < n_ctx:
        raise InputError(f"the calibration text has {n_tokens} tokens, fewer than one chunk of {n_ctx}: give more "
                         f"text or a smaller {ctx_option}")


def check_imatrix(path: Path, tensors: Mapping[str, tuple[int, int]], model: Path) -> None:
    """The importance matrix in ``path`` was made for this model: some of its entries are tensors of the model,
    and every such entry has the tensor's row width (times its experts). ``tensors``: GGUF name -> (row width,
    experts)."""
    from llmquant.gguf_io.imatrix import read_imatrix

    check_inputs([path])
    data = read_imatrix(path)
    shared = [name for name in data.entries if name in tensors]
    if data.entries and not shared:
        example = next(iter(data.entries))
        raise InputError(f"{path}: none of its {len(data.entries)} entries (e.g. {example}) is a tensor of {model}; "
                         "it was made for another model: compute one for this model (llmquant imatrix)")
    for name in shared:
        entry = data.entries[name]
        width, n_experts = tensors[name]
        if name == "token_embd.weight":
            continue  # llama.cpp ignores a mismatched token-embedding entry
        if entry.n_cols * entry.n_mat != width * n_experts:
            raise InputError(f"{path}: entry {name} has {entry.n_cols * entry.n_mat} values but the tensor in "
                             f"{model} has rows of {width}" + (f" and {n_experts} experts" if n_experts > 1 else "")
                             + "; the imatrix was made for another model")


def gguf_tensor_widths(path: Path) -> dict[str, tuple[int, int]]:
    """GGUF name -> (row width, experts) of every tensor of a GGUF file, from its header."""
    from llmquant.gguf_io.header import read_gguf_header

    return {t.name: (int(t.shape[0]), int(t.shape[2]) if len(t.shape) > 2 else 1)
            for t in read_gguf_header(path).tensors}


def folder_tensor_widths(folder: Path, weights: Any) -> dict[str, tuple[int, int]]:
    """GGUF name -> (row width, experts) of every tensor the converter would make of a Hugging Face folder."""
    from llmquant.models.architectures import find_architecture, plan_tensors
    from llmquant.models.config import read_config

    config = read_config(folder)
    plans = plan_tensors(find_architecture(config), config, weights)
    return {p.name: (int(p.shape[-1]), int(p.shape[0]) if len(p.shape) > 2 else 1) for p in plans}


def check_quantize(model: Path, outputs: Sequence[Path], imatrix_file: str | os.PathLike | None,
                   calib: Sequence[str], calib_ctx: int, calib_chunks: int | None, allow_pickle: bool) -> None:
    """``quantize``'s checks: the outputs, the model (a folder under the pickle rule, with room for its converted
    copy), the importance matrix against the model's tensors, the calibration text's files and length."""
    for folder in dict.fromkeys(Path(os.path.abspath(p)).parent for p in outputs):
        _probe(_existing_folder(folder))
    check_inputs([model])
    imatrix = Path(imatrix_file).expanduser() if imatrix_file else None
    inputs = [model, *([imatrix] if imatrix else []), *(Path(s) for s in calib)]
    for target in outputs:
        if Path(target).is_dir():
            raise OutputError(f"{target}: is a folder; give a file name")
        check_not_input(target, inputs)
    check_text_files(calib)
    weights = None
    if model.is_dir():
        weights = check_model_folder(model, allow_pickle)
        n_bytes = sum(file.stat().st_size for file in {entry.file for entry in weights.entries.values()})
        check_room(Path(outputs[0]).parent, n_bytes, what="the model converted first (to a temporary GGUF)")
    if imatrix is not None:
        if not imatrix.is_file():
            raise InputError(f"{imatrix}: no such imatrix file")
        widths = folder_tensor_widths(model, weights) if weights is not None else gguf_tensor_widths(model)
        check_imatrix(imatrix, widths, model)
    if calib and model.is_dir():
        if calib_chunks is not None and calib_chunks < 1:
            raise InputError(f"--calib-chunks must be at least 1, got {calib_chunks}")
        check_calibration_length(model, calib, calib_ctx, ctx_option="--calib-ctx")


# ---- weights -----------------------------------------------------------------------------------------------------


def check_finite(label: str, values: Any, first_row: int = 0) -> None:
    """Refuse NaN or infinite weights, naming the tensor, how many there are and where the first one is
    (``first_row``: the row of ``values[0]`` in the whole tensor)."""
    import torch

    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    # a finite sum proves every value finite (one fast pass); summed in float32, as an F16 sum overflows at 65504
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if count == 0:
        return  # only the sum overflowed
    flat = int(torch.nonzero(bad.reshape(-1), as_tuple=False)[0, 0])
    position = [int(i) for i in np.unravel_index(flat, tuple(tensor.shape))] if tensor.ndim else []
    if position:
        position[0] += first_row
    where = f"row {position[0]}, column {position[-1]}" if len(position) == 2 else f"index {position}"
    value = tensor.reshape(-1)[flat].item()
    raise InputError(f"tensor {label}: {count} non-finite value{'s' if count != 1 else ''} (NaN or inf), the first "
                     f"({value}) at {where}; the weights are damaged: re-download or repair the model")


def _files_of(path: Path) -> list[Path]:
    """A file, or a folder and the files directly in it."""
    if path.is_dir():
        with contextlib.suppress(OSError):
            return [path, *(p for p in path.iterdir() if p.is_file())]
        return [path]
    return [path]


__all__ = ["PROBE_BYTES", "check_calibration_length", "check_finite", "check_imatrix", "check_inputs",
           "check_model_folder", "check_not_input", "check_output", "check_output_folder", "check_room",
           "check_quantize", "check_text_files", "folder_tensor_widths", "gguf_tensor_widths", "os_error",
           "output_file", "wants_folder", "writing", "written_atomically"]
