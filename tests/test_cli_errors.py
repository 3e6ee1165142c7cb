"""Bad input on every command: one line naming the path or tensor, a non-zero exit, no traceback, the source
unchanged and nothing left behind, in the output folder or the temporary folder; checked before the work.

Tiny models only (hidden 64, two layers, a 768-token vocabulary), so the whole file runs in seconds: most cases
run in-process through click's CliRunner; the read-only folder and the full disk need a process of their own
(a file-size limit, and for root a process without the capability that lets root write anywhere).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from safetensors import safe_open
from safetensors.torch import save_file

from llmquant.calibration.builtin import builtin_text
from llmquant.cli import EXIT_INTERRUPTED, cli
from llmquant.errors import os_error_line
from llmquant.gguf_io.imatrix import imatrix_data_from_sums, write_imatrix_gguf
from llmquant.pipeline.convert import convert_model
from tests.models.tiny_models import build_tiny

CTX = ["--ctx", "64", "--chunks", "1"]


@pytest.fixture(scope="module")
def tiny_folder(test_cache: Path) -> Path:
    return build_tiny("llama", test_cache / "convert-tiny-llama")


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_folder: Path) -> dict[str, Path]:
    """The tiny model as F16 GGUF, a calibration text, and the reference's saved logits (one chunk of 64)."""
    from llmquant.pipeline.evaluate import reference_logits

    root = tmp_path_factory.mktemp("inputs")
    gguf_path = convert_model(tiny_folder, root / "tiny-F16.gguf").path
    text = root / "text.txt"
    text.write_text(builtin_text()[:20_000], encoding="utf-8")
    logits = root / "tiny.logits"
    with reference_logits(str(tiny_folder), [str(text)], 64, 1, backend="torch", save_to=logits):
        pass
    return {"folder": tiny_folder, "gguf": gguf_path, "text": text, "logits": logits}


@pytest.fixture
def temp_folder(tmp_path: Path, monkeypatch) -> Path:
    """The temporary folder every job sees (tempfile's), empty at the start."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def digest(path: Path) -> str:
    """A hash of a file, or of every file in a folder, to show that a source is unchanged."""
    h = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            h.update(file.name.encode())
            h.update(file.read_bytes())
    return h.hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.is_dir() else []


def run(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line(result, *needles: str, exit_code: int = 1) -> str:
    """The command failed with ``exit_code``, printing one ``Error:`` line holding every needle, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- the output is not the input -------------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["same path", "symbolic link", "hard link"])
def test_quantize_refuses_to_write_over_its_source(link, work, tmp_path, temp_folder):
    source = tmp_path / "model-f16.gguf"
    shutil.copy(work["gguf"], source)
    output = {"same path": source, "symbolic link": tmp_path / "link.gguf", "hard link": tmp_path / "hard.gguf"}[link]
    if link == "symbolic link":
        output.symlink_to(source)
    elif link == "hard link":
        os.link(source, output)
    before, names = digest(source), listing(tmp_path)
    result = run(["quantize", source, "-o", output, "--type", "Q8_0"])
    assert_one_line(result, str(output), "destroy the source")
    assert digest(source) == before and listing(tmp_path) == names and listing(temp_folder) == []


def test_convert_refuses_to_write_over_a_file_of_the_model(work, tmp_path, temp_folder):
    folder = Path(shutil.copytree(work["folder"], tmp_path / "model"))
    before = digest(folder)
    result = run(["convert", folder, "-o", folder / "model.safetensors"])
    assert_one_line(result, "model.safetensors", "destroy the source")
    assert digest(folder) == before and listing(temp_folder) == []


def test_imatrix_refuses_to_write_over_its_calibration_text(work, tmp_path, temp_folder):
    text = Path(shutil.copy(work["text"], tmp_path / "calib.txt"))
    before = digest(text)
    result = run(["imatrix", work["folder"], "-f", text, "-o", text, *CTX])
    assert_one_line(result, str(text), "destroy the source")
    assert digest(text) == before and listing(tmp_path) == ["calib.txt", "tmp"]


def test_eval_refuses_to_save_the_reference_over_the_model(work, tmp_path, temp_folder):
    model = Path(shutil.copy(work["gguf"], tmp_path / "q.gguf"))
    before = digest(model)
    result = run(["eval", model, "--reference", work["folder"], "-f", work["text"], *CTX, "--save-reference", model])
    assert_one_line(result, str(model), "destroy the source")
    assert digest(model) == before and listing(temp_folder) == []


def test_compare_refuses_an_output_folder_that_is_a_file(work, tmp_path, temp_folder):
    taken = tmp_path / "report"
    taken.write_text("notes")
    result = run(["compare", work["gguf"], "--reference", work["logits"], "-o", taken])
    assert_one_line(result, str(taken), "is a file")
    assert taken.read_text() == "notes" and listing(temp_folder) == []


# ---- -o naming a folder --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new folder/", "existing folder"])
def test_quantize_with_one_type_writes_into_a_folder(existing, work, tmp_path):
    folder = tmp_path / "quants"
    if existing:
        folder.mkdir()
    result = run(["quantize", work["gguf"], "-o", f"{folder}/" if not existing else folder, "--type", "Q8_0"])
    assert result.exit_code == 0, result.output
    assert listing(folder) == ["tiny-Q8_0.gguf"]
    assert str(folder / "tiny-Q8_0.gguf") in result.stdout


def test_convert_imatrix_and_save_reference_write_into_an_existing_folder(work, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    convert = run(["convert", work["folder"], "-o", out])
    assert convert.exit_code == 0, convert.output
    assert f"wrote {out / 'convert-tiny-llama-F16.gguf'}" in convert.stdout and "KiB" in convert.stdout
    imatrix = run(["imatrix", work["folder"], "-f", work["text"], "-o", out, *CTX])
    assert imatrix.exit_code == 0, imatrix.output
    assert f"wrote {out / 'imatrix.gguf'}" in imatrix.stdout
    evaluated = run(["eval", work["gguf"], "--reference", work["folder"], "-f", work["text"], *CTX,
                     "--save-reference", out, "--backend", "torch"])
    assert evaluated.exit_code == 0, evaluated.output
    assert listing(out) == ["convert-tiny-llama-F16.gguf", "imatrix.gguf", "reference.logits"]


# ---- one pickle rule -----------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs a command: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_folder(source: Path, target: Path, marker: Path | None = None) -> Path:
    """``source`` with its safetensors replaced by pytorch_model.bin (holding code to run when ``marker``)."""
    folder = Path(shutil.copytree(source, target))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        state: dict = {name: f.get_tensor(name) for name in f.keys()}
    (folder / "model.safetensors").unlink()
    if marker is not None:
        state["lm_head.weight"] = _RunsCode(marker)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def every_command(model: Path, work: dict[str, Path], out: Path) -> dict[str, list]:
    """Each command that reads weights, reading them from ``model``."""
    text = ["-f", work["text"]]
    return {
        "convert": ["convert", model, "-o", out / "x.gguf"],
        "imatrix": ["imatrix", model, *text, "-o", out / "imatrix.gguf", *CTX],
        "quantize": ["quantize", model, "-o", out / "q.gguf", "--type", "Q8_0"],
        "eval": ["eval", model, "--reference", work["logits"]],
        "eval --reference": ["eval", work["gguf"], "--reference", model, *text, *CTX],
        "compare": ["compare", work["gguf"], "--reference", model, *text, *CTX, "-o", out / "report"],
    }


COMMANDS = ["convert", "imatrix", "quantize", "eval", "eval --reference", "compare"]


@pytest.mark.parametrize("command", COMMANDS)
def test_pickled_weights_are_refused_without_the_flag(command, work, tmp_path, temp_folder):
    folder = pickled_folder(work["folder"], tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    before = digest(folder)
    assert_one_line(run(every_command(folder, work, out)[command]), str(folder), "pytorch_model.bin",
                    "--allow-pickle")
    assert digest(folder) == before and listing(out) == [] and listing(temp_folder) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_a_pickle_that_runs_code_is_refused_with_the_flag_too(command, work, tmp_path, temp_folder):
    marker = tmp_path / "code-ran"
    folder = pickled_folder(work["folder"], tmp_path / "model", marker=marker)
    out = tmp_path / "out"
    out.mkdir()
    result = run([*every_command(folder, work, out)[command], "--allow-pickle"])
    assert_one_line(result, str(folder / "pytorch_model.bin"), "refused", "could run code")
    assert not marker.exists() and listing(out) == [] and listing(temp_folder) == []
    assert "weights_only" not in result.output  # torch's advice to turn the protection off


def test_quantize_reads_trusted_pickles_with_the_flag(work, tmp_path):
    folder = pickled_folder(work["folder"], tmp_path / "pickled" / work["folder"].name)  # the same general.name
    result = run(["quantize", folder, "-o", tmp_path / "q.gguf", "--type", "Q8_0", "--allow-pickle"])
    assert result.exit_code == 0, result.output
    expected = run(["quantize", work["folder"], "-o", tmp_path / "from-safetensors.gguf", "--type", "Q8_0"])
    assert expected.exit_code == 0, expected.output
    assert (tmp_path / "q.gguf").read_bytes() == (tmp_path / "from-safetensors.gguf").read_bytes()


def test_every_command_that_reads_weights_has_the_flag():
    for command in ["convert", "imatrix", "quantize", "eval", "compare"]:
        assert "--allow-pickle" in run([command, "--help"]).output


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_model_is_named_by_every_command(command, work, tmp_path, temp_folder):
    missing = tmp_path / "no-such-model"
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line(run(every_command(missing, work, out)[command]), str(missing), "no such")
    assert listing(out) == [] and listing(temp_folder) == []


# ---- non-finite weights --------------------------------------------------------------------------------------------


def test_convert_refuses_a_nan_weight_naming_tensor_count_and_position(work, tmp_path, temp_folder):
    folder = Path(shutil.copytree(work["folder"], tmp_path / "model"))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    state["model.layers.1.mlp.down_proj.weight"][3, 17] = float("nan")
    state["model.layers.1.mlp.down_proj.weight"][5, 2] = float("inf")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    before, out = digest(folder), tmp_path / "out"
    out.mkdir()
    assert_one_line(run(["convert", folder, "-o", out / "m.gguf"]), "model.layers.1.mlp.down_proj.weight",
                    "2 non-finite values", "row 3, column 17")
    assert digest(folder) == before and listing(out) == [] and listing(temp_folder) == []


def test_quantize_names_the_tensor_with_a_nan_its_count_and_position(work, tmp_path, temp_folder):
    source = Path(shutil.copy(work["gguf"], tmp_path / "nan-f16.gguf"))
    reader = GGUFReader(source, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    tensor.data[10, 33] = np.nan  # numpy order: row 10, column 33
    del reader
    before, out = digest(source), tmp_path / "out"
    out.mkdir()
    assert_one_line(run(["quantize", source, "-o", out / "q.gguf", "--type", "Q8_0"]), "blk.1.ffn_down.weight",
                    "1 non-finite value", "row 10, column 33")
    assert digest(source) == before and listing(out) == [] and listing(temp_folder) == []


# ---- checks before the work ----------------------------------------------------------------------------------------


@pytest.fixture
def no_conversion(monkeypatch):
    """Makes any conversion (the first step of quantizing a folder) fail the test."""
    import llmquant.pipeline.convert as convert_job

    def convert_model(*_args, **_kwargs):
        raise AssertionError("the model was converted before the inputs were checked")

    monkeypatch.setattr(convert_job, "convert_model", convert_model)


def _imatrix_file(path: Path, widths: dict[str, int]) -> Path:
    sums = {name: np.ones((1, width), dtype=np.float32) for name, width in widths.items()}
    counts = {name: np.ones(1, dtype=np.int64) for name in widths}
    write_imatrix_gguf(path, imatrix_data_from_sums(sums, counts, ["other.txt"], chunk_size=64))
    return path


@pytest.mark.parametrize("model", ["folder", "gguf"])
def test_an_imatrix_from_another_model_is_refused_before_the_work(model, work, tmp_path, temp_folder, no_conversion):
    other = _imatrix_file(tmp_path / "other.gguf", {"blk.0.attn_q.weight": 576, "blk.0.ffn_down.weight": 1536})
    assert_one_line(run(["quantize", work[model], "-o", tmp_path / "q.gguf", "--type", "Q8_0", "--imatrix", other]),
                    str(other), "blk.0.attn_q.weight", "has 576 values", "rows of 64")
    unrelated = _imatrix_file(tmp_path / "unrelated.gguf", {"model.encoder.0.weight": 64})
    assert_one_line(run(["quantize", work[model], "-o", tmp_path / "q.gguf", "--type", "Q8_0", "--imatrix",
                         unrelated]), str(unrelated), "another model")
    assert listing(tmp_path) == ["other.gguf", "tmp", "unrelated.gguf"] and listing(temp_folder) == []


def test_a_missing_calibration_file_is_named_before_the_conversion(work, tmp_path, temp_folder, no_conversion):
    missing = tmp_path / "wiki.txt"
    assert_one_line(run(["quantize", work["folder"], "-o", tmp_path / "q.gguf", "--type", "Q8_0", "--calib",
                         missing]), str(missing), "no such text file")
    assert listing(tmp_path) == ["tmp"] and listing(temp_folder) == []


def test_a_short_calibration_text_names_calib_ctx_before_the_conversion(work, tmp_path, no_conversion):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    line = assert_one_line(run(["quantize", work["folder"], "-o", tmp_path / "q.gguf", "--type", "Q8_0",
                                "--calib", short, "--calib-ctx", "512"]), "fewer than one chunk of 512")
    assert line.endswith("a smaller --calib-ctx")


def test_eval_with_saved_logits_says_text_files_are_not_used(work):
    assert_one_line(run(["eval", work["gguf"], "--reference", work["logits"], "-f", work["text"]]),
                    str(work["logits"]), "-f is not used")


def test_compare_without_matplotlib_says_how_to_get_it_before_the_work(work, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert_one_line(run(["compare", work["gguf"], "--reference", work["logits"], "-o", tmp_path / "report"]),
                    "matplotlib", "llmquant[plot]")
    assert not (tmp_path / "report").exists()


def test_ctrl_c_exits_130_and_leaves_nothing(work, tmp_path, temp_folder, monkeypatch):
    import llmquant.pipeline.convert as convert_job

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_job, "encode", interrupted)
    result = run(["convert", work["folder"], "-o", tmp_path / "out" / "m.gguf"])
    assert result.exit_code == EXIT_INTERRUPTED == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    assert listing(tmp_path / "out") == [] and listing(temp_folder) == []


def test_os_errors_become_a_line_naming_the_path_and_what_to_do():
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device"), "out.gguf") == \
        "out.gguf: no space left on the device; free some space or write elsewhere (-o)"
    assert os_error_line(PermissionError(errno.EACCES, "Permission denied", "/ro/x")).startswith(
        "/ro/x: permission denied")
    assert "ulimit -f" in os_error_line(OSError(errno.EFBIG, "File too large"), "q.gguf")


# ---- a read-only output folder and a full disk, for every command ---------------------------------------------------

_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from click.testing import CliRunner
    from llmquant.cli import cli
    from llmquant.formats import quantize
    import llmquant.pipeline.convert, llmquant.pipeline.evaluate, llmquant.pipeline.imatrix, llmquant.pipeline.quantize

    quantize(np.ones((1, 32), np.float32), "Q8_0")  # compile (and cache) the kernels while files can be written
    started = []  # the jobs' work, recorded when it begins

    def record(module, name):
        real = getattr(module, name)
        def started_work(*args, **kwargs):
            started.append(name)
            return real(*args, **kwargs)
        setattr(module, name, started_work)

    record(llmquant.pipeline.convert, "StreamingGGUFWriter")
    record(llmquant.pipeline.quantize, "quantize_gguf")
    record(llmquant.pipeline.imatrix, "load_causal_lm")
    record(llmquant.pipeline.evaluate, "open_backend")
    results = []
    for case in json.loads(sys.argv[1]):
        started.clear()
        if case["limit"] is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case["limit"], resource.RLIM_INFINITY))
        result = CliRunner().invoke(cli, case["args"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        results.append({"exit_code": result.exit_code, "stderr": result.stderr, "output": result.output,
                        "exception": None if result.exception is None else type(result.exception).__name__,
                        "started": list(started)})
    print(json.dumps(results))
""")


def _without_root_override() -> None:
    """In the child, before it runs Python: drop CAP_DAC_OVERRIDE from the bounding set, so that after exec
    root is held to file permissions like anyone else (prctl PR_CAPBSET_DROP)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _root_can_drop_override() -> bool:
    try:
        subprocess.run(["true"], preexec_fn=_without_root_override, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def test_read_only_folder_and_full_disk_are_one_line_for_every_command(work, tmp_path):
    """Every command, with its output in a folder it may not write (chmod 555; as root, in a child that has
    dropped the capability to ignore permissions, or else under a regular file), and with a full disk (a
    file-size limit: 1 KiB, below the first small write; 5000 bytes, reached while the output is written)."""
    temp, writable = tmp_path / "tmp", tmp_path / "out"
    temp.mkdir()
    writable.mkdir()
    preexec = None
    if os.geteuid() != 0:
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
    elif _root_can_drop_override():
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
        preexec = _without_root_override
    else:
        read_only = tmp_path / "a-file"  # the one thing root cannot write through: a path under a regular file
        read_only.write_text("")

    def commands(out: Path, reference: Path) -> dict[str, list[str]]:
        text = ["-f", str(work["text"])]
        return {
            "convert": ["convert", str(work["folder"]), "-o", str(out / "m.gguf")],
            "quantize": ["quantize", str(work["gguf"]), "-o", str(out / "q.gguf"), "--type", "Q8_0"],
            "quantize a folder": ["quantize", str(work["folder"]), "-o", str(out / "q.gguf"), "--type", "Q8_0"],
            "imatrix": ["imatrix", str(work["folder"]), *text, "-o", str(out / "imatrix.gguf"), *CTX],
            "eval --save-reference": ["eval", str(work["gguf"]), "--reference", str(work["folder"]), *text, *CTX,
                                      "--save-reference", str(out / "ref.logits")],
            "compare": ["compare", str(work["gguf"]), "--reference", str(reference),
                        *(text + CTX if reference == work["folder"] else CTX[2:]), "-o", str(out / "report")],
        }

    scenarios = {"read-only": (read_only, None, work["folder"]), "full disk": (writable, 1024, work["folder"]),
                 "disk full while writing": (writable, 5000, work["logits"])}
    cases, names = [], []
    for scenario, (out, limit, reference) in scenarios.items():
        for command, args in commands(out, reference).items():
            cases.append({"args": args, "limit": limit})
            names.append((scenario, command, out))
    sources = {path: digest(path) for path in (work["folder"], work["gguf"], work["text"], work["logits"])}
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        child = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                               env=env, preexec_fn=preexec, timeout=600)
    finally:
        if read_only.is_dir():
            read_only.chmod(0o755)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    for (scenario, command, out), result in zip(names, results, strict=True):
        where = f"{scenario}, {command}: {result['output'][-800:]}"
        assert result["exit_code"] == 1 and result["exception"] in (None, "SystemExit"), where
        assert "Traceback" not in result["output"], where
        errors = [line for line in result["stderr"].replace("\r", "\n").splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and errors[0].startswith(f"Error: {out}"), where
        assert ".llmquant-" not in errors[0] and ".partial" not in errors[0], where  # the output, not a temporary
        if scenario != "disk full while writing":  # found before any model ran
            assert result["started"] == [], where
    for scenario, command, out in names:
        assert listing(out) == [], (scenario, command)
    assert listing(temp) == []
    assert {path: digest(path) for path in sources} == sources
