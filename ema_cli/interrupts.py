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
* otherwise (``--watch``, which commits once per checkpoint, and the library)
  the previous handlers come back and a held signal is delivered again right
  after the commit (``signal.raise_signal``), so it acts as if it had arrived
  a moment later: the watch stops, the host program sees its Ctrl-C.  So
  does a commit that failed: its error gives way to the interrupt.

Only the main thread can set handlers (Python runs them there); elsewhere the
commit runs as it is.  Nothing here imports more than the standard library.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

ends_at_commit = False  # the CLI sets this for a command whose process ends once its outputs are committed


def ignore() -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def committing() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, _frame) -> None:
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in SIGNALS}
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok and ends_at_commit:
            ignore()
        else:
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
            for s in dict.fromkeys(held):
                signal.raise_signal(s)
