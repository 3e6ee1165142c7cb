"""Calibration text sources: files, JSONL, datasets, the built-in text."""

from __future__ import annotations

import json
import sys

import pytest

from llmquant.calibration.builtin import BUILTIN_NAME, builtin_text
from llmquant.calibration.sources import DOCUMENT_SEPARATOR, join_sources, load_text_source, load_text_sources
from llmquant.errors import InputError


def test_plain_text_file_is_read_whole(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text("first line\nsecond line <|im_start|>\n", encoding="utf-8")
    source = load_text_source(str(path))
    assert source.text == path.read_text(encoding="utf-8") and source.name == str(path)


def test_jsonl_text_fields_are_joined_in_order(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["alpha", "beta"])) + "\n\n")
    assert load_text_source(str(path)).text == DOCUMENT_SEPARATOR.join(["alpha", "beta"])


def test_jsonl_line_without_text_field_names_the_line_and_fields(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x", "role": "user"}) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: .*'text'.*content, role"):
        load_text_source(str(path))


def test_no_files_means_the_builtin_text():
    (source,) = load_text_sources([])
    assert source.name == BUILTIN_NAME and source.text == builtin_text()


def test_several_files_keep_their_names_and_order(tmp_path):
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path, text in zip(paths, ["one", "two"], strict=True):
        path.write_text(text)
    sources = load_text_sources([str(p) for p in paths])
    assert [s.name for s in sources] == [str(p) for p in paths]
    assert join_sources(sources) == "one" + DOCUMENT_SEPARATOR + "two"


def test_dataset_without_the_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail as if not installed
    with pytest.raises(InputError, match=r"hf:wikitext.*pip install datasets"):
        load_text_source("hf:wikitext:wikitext-2-raw-v1")


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such calibration text file"):
        load_text_source(str(tmp_path / "nope.txt"))


def test_binary_file_is_refused_with_the_offset(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"abc\xff\xfe")
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte 3\)"):
        load_text_source(str(path))
