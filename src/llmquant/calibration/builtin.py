"""The built-in calibration text: English technical prose that ships with every Python.

It is derived at run time from the standard library's ``pydoc_data.topics`` (the text of
Python's language reference), so nothing is downloaded and nothing large is committed.
"""

from __future__ import annotations

import functools

BUILTIN_NAME = "builtin:pydoc-topics"


@functools.lru_cache(maxsize=1)
def builtin_text() -> str:
    """Return the built-in calibration text (about 0.5 MB, ~100k tokens; deterministic for a Python version)."""
    from pydoc_data.topics import topics  # stdlib; present in every CPython

    parts = [topics[key].strip() for key in sorted(topics)]
    return "\n\n".join(part for part in parts if part)
