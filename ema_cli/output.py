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


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            fsync_file(os.path.join(root, f))
        _fsync_dir(root)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: str, base: str) -> None:
    """Staging leftovers of runs that were killed (SIGKILL gives no chance to clean
    up) are removed by the next run writing the same output."""
    prefix = f".{base}.ema-avg-"
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and (name.endswith(".tmp") or name.endswith(".tmp.old"))):
            continue
        try:
            pid = int(name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            path = os.path.join(parent, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


class Staged:
    """A staging file or directory for ``final``; ``commit`` renames it into place.

    Without ``force``, a file is committed with ``link`` (fails if the output
    appeared meanwhile, e.g. from a concurrent run) rather than ``rename``."""

    def __init__(self, final: str, *, is_dir: bool = False, force: bool = True):
        self.final = os.path.abspath(final)
        self.is_dir = is_dir
        self.force = force
        parent, base = os.path.split(self.final)
        remove_stale(parent, base)
        self.path = os.path.join(parent, f".{base}.ema-avg-{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            if is_dir:
                os.mkdir(self.path)
        except OSError as e:
            raise EmaError(f"cannot create the output: {e.strerror}", path=parent) from None
        self.done = False

    def commit(self) -> None:
        try:
            self._commit()
        except FileExistsError:
            raise EmaError("output appeared while writing it (use --force to overwrite)", path=self.final) from None
        except OSError as e:
            raise EmaError(f"cannot move the output into place: {e.strerror}", path=self.final) from None

    def _commit(self) -> None:
        parent = os.path.dirname(self.final)
        if self.is_dir:
            _fsync_tree(self.path)
        if not self.force and not self.is_dir:
            os.link(self.path, self.final)  # atomic, and never replaces an existing file
            os.unlink(self.path)
        elif not self.force and os.path.lexists(self.final):
            raise FileExistsError(self.final)
        elif self.is_dir and os.path.isdir(self.final) and not os.path.islink(self.final):
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
