"""Atomic outputs: everything is written to a staging path next to the target
(same directory, so the final rename is atomic), fsync'ed, then renamed into
place.  A failed or killed run leaves nothing at the output path (at most a
hidden ``.NAME.ema-avg-*.tmp`` staging file, removed on any failure we see)."""

from __future__ import annotations

import os
import secrets
import shutil

from ema_cli.errors import EmaError


def check_target(final: str, *, force: bool, is_dir: bool) -> None:
    """Refuse before any work: missing or unwritable directory, existing output."""
    parent = os.path.dirname(os.path.abspath(final))
    if not os.path.isdir(parent):
        raise EmaError("output directory does not exist", path=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EmaError("output directory is not writable", path=parent)
    if os.path.lexists(final):
        if not force:
            raise EmaError("output exists (use --force to overwrite)", path=final)
        if os.path.isdir(final) and not is_dir:
            raise EmaError("output is a directory; expected a file path", path=final)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


class Staged:
    """A staging file or directory for ``final``; ``commit`` renames it into place."""

    def __init__(self, final: str, *, is_dir: bool = False):
        self.final = os.path.abspath(final)
        self.is_dir = is_dir
        parent, base = os.path.split(self.final)
        self.path = os.path.join(parent, f".{base}.ema-avg-{os.getpid()}-{secrets.token_hex(4)}.tmp")
        if is_dir:
            os.mkdir(self.path)
        self.done = False

    def commit(self) -> None:
        parent = os.path.dirname(self.final)
        if self.is_dir:
            _fsync_tree(self.path)
        if self.is_dir and os.path.isdir(self.final) and not os.path.islink(self.final):
            # a directory cannot replace a non-empty one atomically: swap, then drop the old
            trash = self.path + ".old"
            os.rename(self.final, trash)
            os.rename(self.path, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.final)
        _fsync_dir(parent)
        self.done = True

    def discard(self) -> None:
        if self.done:
            return
        try:
            if os.path.isdir(self.path) and not os.path.islink(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
            elif os.path.lexists(self.path):
                os.unlink(self.path)
        except OSError:
            pass
