"""Errors that are the user's to fix (bad config, missing folder, full disk), told apart from bugs.

``grpo.cli.run_cli`` prints a ``UserError`` as one line and exits with status 2; anything else is a bug and keeps
its traceback. ``ConfigError`` (grpo/config.py) and the task's data-file errors subclass ``UserError``.

A full disk rarely says so: Python raises ``OSError(ENOSPC)`` without the file name, safetensors wraps it in its
own error, and ``torch.save`` reports only a C++ stream position ("[enforce fail at inline_container.cc] unexpected
pos …") or ``basic_ios::clear: iostream error``. ``report_disk_full(path)`` turns all of them into ``DiskFullError``
naming the path being written.
"""
from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class UserError(ValueError):
    """The input is wrong, not the code: the message says what to change. The CLI prints it without a traceback."""


class DiskFullError(UserError, OSError):
    """A write failed because its file system (or the user's quota) has no space left. Still an ``OSError``
    (errno ENOSPC), so code that handles failed writes keeps handling it."""

    def __init__(self, message: str, filename: str | None = None):
        super().__init__(message)
        self.errno, self.strerror, self.filename = errno.ENOSPC, message, filename

    def __str__(self) -> str:  # OSError's own would prefix "[Errno 28]" and append the file name again
        return self.args[0]


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28",
                    "os error 122")
# What torch.save's C++ writer says when a write comes up short; only a near-empty disk makes it a full-disk error.
_SHORT_WRITE_WORDS = ("unexpected pos", "basic_ios::clear", "iostream error", "PytorchStreamWriter failed writing",
                      "file write failed")
_NEARLY_FULL_BYTES = 64 * 2**20


def free_bytes(path: str | Path) -> int | None:
    """Free space on the file system holding ``path`` (its nearest existing ancestor), or None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def disk_full_error(exc: BaseException, path: str | Path) -> DiskFullError | None:
    """``DiskFullError`` naming ``path`` if ``exc`` is a failed write to a full disk, else None."""
    if isinstance(exc, DiskFullError):
        return exc
    text = str(exc)
    full = (isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS) or any(w in text for w in _DISK_FULL_WORDS)
    free = free_bytes(path)
    if not full and any(w in text for w in _SHORT_WRITE_WORDS):
        full = free is not None and free < _NEARLY_FULL_BYTES
    if not full:
        return None
    target = getattr(exc, "filename", None) or path
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the write came up short"
    left = f", {_size(free)} free there" if free is not None else ""
    return DiskFullError(f"disk full while writing {target} ({reason}{left}): free some space or point out_dir "
                         f"at a bigger disk", str(target))


@contextmanager
def report_disk_full(path: str | Path) -> Iterator[None]:
    """Re-raise a full-disk failure of the writes inside the block as ``DiskFullError`` naming ``path``."""
    try:
        yield
    except Exception as exc:
        full = disk_full_error(exc, path)
        if full is None or full is exc:
            raise
        raise full from exc
