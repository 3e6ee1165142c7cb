"""Errors meant for people: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import errno
import os


class LlmquantError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class InputError(LlmquantError):
    """A file or model the user gave us is missing, corrupt, truncated or unsupported."""


class OutputError(LlmquantError):
    """An output that cannot be written: a read-only folder, a full disk, a path that is the input itself."""


# errno -> what went wrong and what to do, for the one line an OSError becomes
_OS_ERRORS: dict[int, str] = {
    errno.EACCES: "permission denied; choose a folder you can write to (-o) or change its permissions",
    errno.EPERM: "operation not permitted; choose a folder you can write to (-o)",
    errno.EROFS: "the file system is read-only; choose another output folder (-o)",
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere (-o)",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere (-o)",
    errno.EFBIG: "file too large for this system's file-size limit (ulimit -f) or file system; write elsewhere "
                 "(-o) or raise the limit",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder; give a file name",
    errno.EEXIST: "already exists",
    errno.EIO: "input/output error from the device; check the disk",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter path",
}


def os_error_line(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OSError: the path (``path``, else the error's own), what went wrong and what to do."""
    where = path if path is not None else exc.filename
    what = _OS_ERRORS.get(exc.errno or -1) or (exc.strerror or str(exc) or type(exc).__name__)
    return f"{os.fsdecode(where)}: {what}" if where is not None else what
