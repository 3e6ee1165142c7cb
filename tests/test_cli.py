"""The command line: version, and --help for every command teaches with an example."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from llmquant import __version__
from llmquant.cli import cli

COMMANDS = ["convert", "imatrix", "quantize", "eval", "inspect"]


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_top_level_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(command: str):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output
    assert f"llmquant {command}" in result.output


def test_quantize_help_lists_the_registered_file_and_tensor_types():
    from llmquant.formats import FORMATS
    from llmquant.pipeline.quantize import supported_file_types, supported_tensor_types

    result = CliRunner().invoke(cli, ["quantize", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # click wraps the epilog at spaces
    assert f"File types (--type): {' '.join(supported_file_types())}." in text
    assert ", ".join(f"{name} ({FORMATS[name].bits_per_weight:g})" for name in supported_tensor_types()) in text
    assert set(supported_tensor_types()) == set(FORMATS)


def test_quantize_with_a_method_reports_it_per_layer_and_as_json(tiny_llama_hf, tmp_path):
    import json

    args = ["quantize", str(tiny_llama_hf), "-o", str(tmp_path / "q.gguf"), "--type", "Q4_0", "--method", "gptq",
            "--calib", "builtin", "--calib-chunks", "1", "--calib-ctx", "64"]
    verbose = CliRunner().invoke(cli, [*args, "--verbose"])
    assert verbose.exit_code == 0, verbose.output
    assert "method: gptq on 14 tensors, 64 calibration tokens" in verbose.output
    assert "plain rounding's" in verbose.output
    assert verbose.output.count("    layer ") == 2  # one line per decoder layer
    as_json = CliRunner().invoke(cli, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)  # the log and progress bars go to stderr
    method = report[0]["method"]
    assert method["method"] == "gptq" and method["calibration_tokens"] == 64
    assert len(method["layers"]) == 2 and method["output_error"] < method["output_error_rtn"]


def test_quantize_rejects_an_unknown_method():
    result = CliRunner().invoke(cli, ["quantize", "smollm2-135m", "-o", "x.gguf", "--type", "Q4_0",
                                      "--method", "smoothquant"])
    assert result.exit_code != 0 and "smoothquant" in result.output
