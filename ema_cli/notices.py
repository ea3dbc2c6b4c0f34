"""Warnings for the person at the terminal: one ``warning: ...`` line on stderr,
silenced by ``--quiet``.  Library code (formats, engine) calls :func:`warn`.

The Python API (:mod:`ema_cli.api`) collects them instead (:func:`capture`):
they end up in ``Result.warnings`` and are issued as ``EmaWarning`` through
Python's :mod:`warnings`, never printed."""

from __future__ import annotations

import contextlib
import sys
import threading

_quiet = False
_captures: list[list[str]] = []
_lock = threading.Lock()


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def warn(message: str) -> None:
    text = " ".join(message.split())
    with _lock:
        if _captures:
            _captures[-1].append(text)
            return
    if not _quiet:
        print(f"warning: {text}", file=sys.stderr)


@contextlib.contextmanager
def capture():
    """Collect the warnings issued inside the block (in every thread) in the
    yielded list instead of printing them."""
    got: list[str] = []
    with _lock:
        _captures.append(got)
    try:
        yield got
    finally:
        with _lock:
            _captures.remove(got)
