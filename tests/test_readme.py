"""README.md says what the registries hold: its "Supported formats" table names every format registered in
``llmquant.formats`` with its bits per weight and block size, and nothing else; its ``quantize`` row lists the file
types that ``--type`` accepts (``recipes.file_types`` filtered by the registry)."""

from __future__ import annotations

import re
from pathlib import Path

from llmquant.formats import FORMATS
from llmquant.pipeline.quantize import supported_file_types

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _table_rows(section: str) -> list[list[str]]:
    """The cells of a markdown table's body rows (the header and the |---| line left out)."""
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.strip().startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


def _listed(cell: str) -> list[str]:
    return [item.strip() for item in cell.split(",")]


def _formats_table() -> dict[str, tuple[float, int]]:
    """format name -> (bits per weight, block size), as the README's table says them. A row names several formats
    with one bits/weight each, and one block size each or one for all."""
    out: dict[str, tuple[float, int]] = {}
    for cells in _table_rows(_section("Supported formats")):
        names, bits, blocks = _listed(cells[0]), _listed(cells[1]), _listed(cells[2])
        assert len(bits) == len(names), f"row {cells[0]}: {len(names)} formats but {len(bits)} bits/weight"
        assert len(blocks) in (1, len(names)), f"row {cells[0]}: {len(blocks)} block sizes for {len(names)} formats"
        for i, name in enumerate(names):
            assert name not in out, f"{name} is in the table twice"
            out[name] = (float(bits[i]), int(blocks[i if len(blocks) > 1 else 0]))
    return out


def test_formats_table_names_every_registered_format_and_nothing_else():
    table = _formats_table()
    assert sorted(set(FORMATS) - set(table)) == [], "registered but missing from README's Supported formats"
    assert sorted(set(table) - set(FORMATS)) == [], "in README's Supported formats but not registered"


def test_formats_table_gives_each_formats_bits_per_weight_and_block_size():
    for name, (bits, block) in _formats_table().items():
        fmt = FORMATS[name]
        assert bits == fmt.bits_per_weight, f"{name}: README says {bits} bits/weight, the format {fmt.bits_per_weight}"
        assert block == fmt.block_size, f"{name}: README says block {block}, the format {fmt.block_size}"


def test_quantize_row_lists_the_file_types_quantize_accepts():
    row = next(cells for cells in _table_rows(_section("Commands")) if cells[0] == "`quantize`")
    found = re.search(r"llama\.cpp's file types ((?:[A-Z0-9_]+ )*[A-Z0-9_]+);", row[1])
    assert found, f"no 'llama.cpp's file types A B C;' list in the quantize row: {row[1]}"
    assert found.group(1).split() == supported_file_types()


def test_python_examples_run():
    """Every ```python block of the README runs as written (its asserts included)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
