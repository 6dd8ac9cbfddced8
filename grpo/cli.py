"""The entry point every script goes through: user errors become one line and exit status 2.

    if __name__ == "__main__":
        run_cli(main)                 # main(argv) -> anything; argv = sys.argv[1:] without --debug

A ``UserError`` (bad config, bad data file, missing model folder, full disk), a ``FileNotFoundError`` (a path the
user named) or a full-disk ``OSError`` prints ``error: <message>`` on stderr and exits with status 2, like
argparse. Anything else is a bug: its traceback is shown as usual. ``--debug`` anywhere on the command line (or
``GRPO_DEBUG=1``) shows the traceback of user errors too.

Under torchrun every rank parses the same command line and reads the same files, so a ``ConfigError`` is printed by
rank 0 only; other user errors can be rank-specific and are printed by every rank, prefixed with the rank.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from grpo.config import ConfigError
from grpo.errors import UserError, disk_full_error

DEBUG_FLAG = "--debug"
USAGE_ERROR = 2


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("GRPO_DEBUG", "").strip().lower() in ("1", "true", "yes")


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user must fix, or None when ``exc`` is a bug."""
    if isinstance(exc, OSError):
        full = disk_full_error(exc, exc.filename or "a file (run with --debug to see which)")
        if full is not None:
            return str(full)
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{exc.strerror}: {exc.filename}" if exc.filename and exc.strerror else str(exc)
    return None


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Call ``main(argv)`` (``argv`` defaults to ``sys.argv[1:]``; ``--debug`` is taken out of it).

    Returns main's result; on a user error prints one line and raises ``SystemExit(2)``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return main(argv)
    except Exception as exc:
        message = None if debug else user_error_message(exc)
        if message is None:
            raise
        rank = _rank()
        if rank == 0 or not isinstance(exc, ConfigError):
            prefix = f"[rank {rank}] " if rank else ""
            print(f"{prefix}error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR) from None
