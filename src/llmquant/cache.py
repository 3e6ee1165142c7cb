"""Where llmquant keeps what it derives once and reuses: the demo model's folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$LLMQUANT_CACHE``, else ``$XDG_CACHE_HOME/llmquant``, else ``~/.cache/llmquant``."""
    env = os.environ.get("LLMQUANT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmquant"


__all__ = ["cache_root"]
