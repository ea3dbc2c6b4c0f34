"""Warnings for the person at the terminal: one ``warning: ...`` line on stderr,
silenced by ``--quiet``.  Library code (formats, engine) calls :func:`warn`.

The Python API (:mod:`ema_cli.api`) collects them instead (:func:`capture`):
they end up in ``Result.warnings`` and are issued as ``EmaWarning`` through
Python's :mod:`warnings`, never printed.  A capture belongs to the call that
opened it (a context variable), not to the process: two calls running at once
in two threads each get their own warnings.  The threads a call starts for its
work carry its context (:func:`bound`)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from typing import Callable

_quiet = False
_sink: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("ema_avg_notices", default=None)


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def warn(message: str) -> None:
    text = " ".join(message.split())
    sink = _sink.get()
    if sink is not None:
        sink(text)
        return
    if not _quiet:
        print(f"warning: {text}", file=sys.stderr)


@contextlib.contextmanager
def capture(sink: Callable[[str], None] | None = None):
    """Collect the warnings issued inside the block (by this call, in its own
    threads too) in the yielded list instead of printing them; or hand each to
    ``sink`` as it comes (a long-running call: ``watch``)."""
    got: list[str] = []
    token = _sink.set(sink or got.append)  # (list.append: safe from several threads)
    try:
        yield got
    finally:
        _sink.reset(token)


def bound(fn: Callable) -> Callable:
    """``fn`` with the caller's context (its capture), for one call in another
    thread (a context is entered by one thread at a time: bind each call)."""
    return functools.partial(contextvars.copy_context().run, fn)
