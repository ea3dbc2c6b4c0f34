"""Warnings for the person at the terminal: one ``warning: ...`` line on stderr,
silenced by ``--quiet``.  Library code (formats, engine) calls :func:`warn`."""

from __future__ import annotations

import sys

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def warn(message: str) -> None:
    if not _quiet:
        print(f"warning: {' '.join(message.split())}", file=sys.stderr)
