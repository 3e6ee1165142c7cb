"""The built-in texts: English technical prose that ships with every Python, so nothing is downloaded.

Two texts that share no passage, so that what calibrates a model never also scores it:

- ``builtin_text()``, the calibration default: the standard library's ``pydoc_data.topics`` (the text of
  Python's language reference);
- ``heldout_text()``, the evaluation default: the docstrings of a fixed list of standard-library modules (their
  own documentation of functions and classes, not the language reference).
"""

from __future__ import annotations

import functools
import importlib
import inspect

BUILTIN_NAME = "builtin:pydoc-topics"
HELDOUT_NAME = "builtin:stdlib-docstrings"

# pure-Python modules present in every CPython build (none needs a GUI or an optional C library)
_HELDOUT_MODULES = (
    "argparse", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "doctest", "email.message", "enum", "fractions", "ftplib", "functools", "gettext",
    "heapq", "http.client", "imaplib", "inspect", "json", "locale", "logging", "mailbox", "optparse", "os",
    "pathlib", "pdb", "pickle", "pprint", "queue", "random", "re", "sched", "selectors", "shutil", "smtplib",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "typing", "unittest", "urllib.request", "uuid", "wave", "zipfile",
)


@functools.lru_cache(maxsize=1)
def builtin_text() -> str:
    """Return the built-in calibration text (about 0.5 MB, ~100k tokens; deterministic for a Python version)."""
    from pydoc_data.topics import topics  # stdlib; present in every CPython

    parts = [topics[key].strip() for key in sorted(topics)]
    return "\n\n".join(part for part in parts if part)


@functools.lru_cache(maxsize=1)
def heldout_text() -> str:
    """Return the built-in held-out text (about 0.5 MB; deterministic for a Python version): each listed module's
    docstring, then those of its public classes, functions and methods, in name order, each once."""
    parts: list[str] = []
    seen: set[str] = set()

    def add(doc: str | None) -> None:
        text = inspect.cleandoc(doc).strip() if doc else ""
        if text and text not in seen:
            seen.add(text)
            parts.append(text)

    for module_name in _HELDOUT_MODULES:
        module = importlib.import_module(module_name)
        add(module.__doc__)
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                add(value.__doc__)
            if inspect.isclass(value):
                for attribute, member in sorted(vars(value).items()):
                    if not attribute.startswith("_") and inspect.isfunction(member):
                        add(member.__doc__)
    return "\n\n".join(parts)
