"""Calibration text from where people keep it: plain text, JSONL, Hugging Face datasets, or the built-in text.

A source spec is a path (``.jsonl``/``.ndjson`` files are read as one JSON object per line with a ``text``
field; anything else as UTF-8 text) or ``hf:NAME[:CONFIG[:SPLIT]]`` for a dataset through the optional
``datasets`` package. ``builtin`` names the built-in calibration text, ``heldout`` the built-in held-out text
(``calibration.builtin``). No spec at all means the built-in calibration text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmquant.calibration.builtin import BUILTIN_NAME, HELDOUT_NAME, builtin_text, heldout_text
from llmquant.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATASET_PREFIX = "hf:"
TEXT_FIELD = "text"
# how separate documents are joined before tokenizing, so one's last word does not glue onto the next's first
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextSource:
    """One calibration source: ``name`` is what the imatrix file records in ``imatrix.datasets``."""

    name: str
    text: str


def load_text_sources(specs: Sequence[str]) -> list[TextSource]:
    """Read every spec in order; the built-in text when ``specs`` is empty."""
    if not specs:
        return [TextSource(BUILTIN_NAME, builtin_text())]
    return [load_text_source(spec) for spec in specs]


def load_text_source(spec: str) -> TextSource:
    """Read one spec: ``builtin``, ``heldout``, a text file, a JSONL file or ``hf:NAME[:CONFIG[:SPLIT]]``."""
    if spec in ("builtin", BUILTIN_NAME):  # the built-in text, named explicitly (e.g. quantize --calib builtin)
        return TextSource(BUILTIN_NAME, builtin_text())
    if spec in ("heldout", HELDOUT_NAME):  # the built-in evaluation text, which calibration never sees
        return TextSource(HELDOUT_NAME, heldout_text())
    if spec.startswith(DATASET_PREFIX):
        return _load_dataset(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        hint = " (a folder: give the text files inside it)" if path.is_dir() else ""
        raise InputError(f"{path}: no such calibration text file{hint}")
    if path.suffix.lower() in JSONL_SUFFIXES:
        return TextSource(spec, _read_jsonl(path))
    try:
        return TextSource(spec, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); give plain text or JSONL") from None


def join_sources(sources: Sequence[TextSource]) -> str:
    """All sources as one text, tokenized at once as llama-imatrix tokenizes its one prompt file."""
    return DOCUMENT_SEPARATOR.join(source.text for source in sources)


def _read_jsonl(path: Path) -> str:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
                found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                raise InputError(f"{path}:{line_no}: expected an object with a string '{TEXT_FIELD}' field, "
                                 f"found {found or 'an empty object'}")
            texts.append(record[TEXT_FIELD])
    return DOCUMENT_SEPARATOR.join(texts)


def _load_dataset(spec: str) -> TextSource:
    parts = spec[len(DATASET_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise InputError(f"'{spec}': expected hf:NAME[:CONFIG[:SPLIT]], e.g. hf:wikitext:wikitext-2-raw-v1:train")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 and parts[2] else "train")
    try:
        import datasets
    except ImportError:
        raise InputError(f"'{spec}' needs the 'datasets' package (pip install datasets), "
                         "or save the text to a file and pass it with -f") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, missing config: all reported the same way
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"'{spec}': could not load the dataset ({first_line})") from None
    if TEXT_FIELD not in dataset.column_names:
        raise InputError(f"'{spec}': the dataset has no '{TEXT_FIELD}' column (columns: "
                         f"{', '.join(dataset.column_names)})")
    return TextSource(spec, DOCUMENT_SEPARATOR.join(t for t in dataset[TEXT_FIELD] if t))
