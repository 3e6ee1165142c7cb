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
