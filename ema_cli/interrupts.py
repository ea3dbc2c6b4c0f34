"""SIGINT and SIGTERM around the commit, the moment outputs move into place.

Before the commit an interrupt unwinds the run and removes its staging: no
output, exit 130 or 143.  A commit is a few renames (a remote one: several
server-side copies, the index last), and an interrupt between them would leave
some outputs in place and not others, or a directory without its index; an
interrupt just after it would report a failure for a run whose outputs are
complete.  So ``committing()`` holds the two signals while the outputs move:

* when the process ends with this commit (the CLI's one-shot commands, which
  set ``ends_at_commit``), a signal held or arriving afterwards is ignored: the
  run has succeeded, its outputs are in place, and the exit code says so (0);
* inside ``until_done()`` (a ``--watch`` update: the commit, then its
  bookkeeping and its ``on_update``), the signals stay held until the block
  ends, and a held one is delivered then: the update is complete, reported,
  and the watch stops;
* otherwise (the library) the previous handlers come back and a held signal
  is delivered again right after the commit (``signal.raise_signal``), so it
  acts as if it had arrived a moment later: the calling program sees its
  Ctrl-C, with the outputs complete.  So does a commit that failed: its error
  gives way to the interrupt.

Only a signal whose handler is a Python function is held: a default or
ignored one, or one installed outside Python (``faulthandler.register``),
which Python could not put back, is left alone; so are both while a wakeup
fd is set (asyncio's ``add_signal_handler``: the loop has seen the signal
already).  Only the main thread can set handlers (Python runs them there);
elsewhere the commit runs as it is.  Nothing here imports more than the
standard library.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

ends_at_commit = False  # the CLI sets this for a command whose process ends once its outputs are committed


# An interrupt raised where Python swallows exceptions (a weakref callback such as importlib's
# module-lock cleanup during an import, a __del__): CPython hands it to sys.unraisablehook and
# carries on.  The CLI's hook (``_entry``) keeps it here, and ``check()`` raises it again at the next
# safe point (the CLI's imports done, a commit starting): the run stops as the signal asked, with
# one line, instead of printing "Exception ignored ..." and running to the end.
_lost: list[BaseException] = []


def lost(exc: BaseException) -> None:
    _lost.append(exc)


def check() -> None:
    """Raise an interrupt that was swallowed since the last check (main thread only)."""
    if _lost and threading.current_thread() is threading.main_thread():
        exc = _lost[0]
        _lost.clear()
        raise exc.with_traceback(None)


def ignore() -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _set(handlers: dict) -> None:
    """Set every handler even when a pending signal's handler raises in
    between (``signal.signal`` runs pending handlers first): the first such
    exception is raised once all are set."""
    err: BaseException | None = None
    for s, h in handlers.items():
        for _ in range(100):
            try:
                signal.signal(s, h)
                break
            except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt, SIGTERM's exception
                err = err or e
    if err is not None:
        raise err


def _deliver(held: list[int]) -> None:
    for s in dict.fromkeys(held):
        signal.raise_signal(s)


def _wakeup_fd_set() -> bool:
    fd = signal.set_wakeup_fd(-1)
    if fd != -1:
        signal.set_wakeup_fd(fd)
    return fd != -1


class _Scope:
    __slots__ = ("previous", "held")

    def __init__(self):
        self.previous: dict | None = None
        self.held: list[int] = []


_scopes: list[_Scope] = []  # until_done blocks of the main thread, innermost last


@contextlib.contextmanager
def committing() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    check()  # a signal swallowed before the commit stops the run here, before anything moves
    scope = _scopes[-1] if _scopes else None
    if scope is not None and scope.previous is not None:  # an earlier commit of this block holds them already
        yield
        return
    held: list[int] = scope.held if scope is not None else []

    def hold(signum, _frame) -> None:
        held.append(signum)

    previous = {s: h for s in SIGNALS if callable(h := signal.getsignal(s)) and h is not hold}
    if not previous or _wakeup_fd_set():
        yield
        return
    try:
        _set({s: hold for s in previous})
    except BaseException:
        _set(previous)  # a signal that came before the commit: it acts now, as it would have
        raise
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok and ends_at_commit:
            ignore()
        elif ok and scope is not None:
            scope.previous = previous  # held until the until_done block ends
        else:
            _set(previous)
            _deliver(held)


@contextlib.contextmanager
def until_done() -> Iterator[None]:
    """A signal held by a commit inside this block is delivered when the block
    ends (its previous handlers back), not when the commit ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    scope = _Scope()
    _scopes.append(scope)
    try:
        yield
    finally:
        _scopes.pop()
        if scope.previous is not None:
            _set(scope.previous)
            _deliver(scope.held)
