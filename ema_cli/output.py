"""Atomic outputs: everything is written to a staging path next to the target
(same directory, so the final rename is atomic), fsync'ed, then renamed into
place.  A failed or killed run leaves nothing at the output path (at most a
hidden ``.NAME.ema-avg-*.tmp`` staging file, removed on any failure we see).

Output directories (``-o DIR/``, HF shards) are staged as a whole and carry a
marker file, ``.ema-avg.json``, listing the files ema-avg wrote.  ``--force``
replaces a directory only when it holds exactly those files (a previous
ema-avg output); ema-avg never deletes a file it did not write: a directory
holding anything else is refused, naming the foreign files.  A missing or empty
directory is written without ``--force``."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

from ema_cli.errors import EmaError


def token() -> str:
    """Eight random hex digits for a staging name: ``secrets.token_hex(4)``
    (``os.urandom``), without importing ``secrets`` (7 ms of start-up)."""
    return os.urandom(4).hex()

_STAGING = re.compile(r"^\.(?P<name>.+)\.ema-avg-\d+-[0-9a-f]+\.tmp$")  # what Staged (and the TF staging) name


def staging_name(base: str) -> str:
    return f".{base}.ema-avg-{os.getpid()}-{token()}.tmp"


def shown_path(path: str) -> str:
    """The output path the user named behind a staging path (a hidden
    ``.NAME.ema-avg-PID-XXXX.tmp`` file or directory, anywhere in the path: a
    shard inside a staged directory is shown inside the output directory), for
    messages; any other path (a URL among them) as it is."""
    if "://" in path or ".ema-avg-" not in path:
        return path
    head, parts = path, []
    while True:
        head, base = os.path.split(head)
        if not base:
            break
        m = _STAGING.match(base)
        parts.append(m.group("name") if m else base)
        if not head or head == os.sep:
            break
    parts.reverse()
    return os.path.join(head, *parts) if head else os.path.join(*parts)


MARKER = ".ema-avg.json"  # formats.OUTPUT_MARKER: input scans leave such directories out


def check_target(final: str, *, force: bool, is_dir: bool) -> None:
    """Refuse before any work: missing or unwritable directory, existing output."""
    parent = os.path.dirname(os.path.abspath(final))
    if not os.path.isdir(parent):
        raise EmaError("output directory does not exist (ema-avg creates the output itself, a file, TF prefix "
                       "or directory, never its parent directories: create it first)", path=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EmaError("output directory is not writable", path=parent)
    if is_dir:
        _check_dir_target(final, force)
        return
    if os.path.lexists(final):
        if not force:
            raise EmaError("output exists (use --force to overwrite)", path=final)
        if os.path.isdir(final):
            raise EmaError("output is a directory; expected a file path", path=final)


def dir_state(path: str) -> tuple[str, list[str]]:
    """What is at a directory output's path: ``("missing", [])``, ``("empty", [])``,
    ``("ours", files)`` (a previous ema-avg output: its marker lists every file
    in it; ``files`` relative), ``("foreign", names)`` (anything else: some of
    the entries ema-avg did not write), ``("file", [])`` (not a directory, or a
    symbolic link).  Stops walking once a few foreign entries are found."""
    if not os.path.lexists(path):
        return "missing", []
    if os.path.islink(path) or not os.path.isdir(path):
        return "file", []
    listed = _marker_files(path)
    parents = {os.path.dirname(f) for f in listed or ()} - {""}
    ours: list[str] = []
    foreign: list[str] = []
    for root, subdirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        for d in sorted(subdirs):
            d = os.path.normpath(os.path.join(rel, d))
            if d not in parents and not any(p.startswith(d + os.sep) for p in parents):
                foreign.append(d + "/")
        subdirs[:] = [d for d in subdirs if os.path.normpath(os.path.join(rel, d)) in parents]
        for f in sorted(files):
            f = os.path.normpath(os.path.join(rel, f))
            if listed is not None and (f == MARKER or f in listed):
                ours.append(f)
            else:
                foreign.append(f)
        if len(foreign) > 5:
            break
    if foreign:
        return "foreign", foreign
    if not ours:
        return "empty", []
    return "ours", sorted(f for f in ours if f != MARKER)


def _marker_files(path: str) -> set[str] | None:
    try:
        with open(os.path.join(path, MARKER)) as fh:
            doc = json.load(fh)
        files = doc["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return None
        return {os.path.normpath(f) for f in files}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _foreign_error(final: str, foreign: list[str]) -> EmaError:
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    return EmaError(f"output directory holds files ema-avg did not write ({shown}); ema-avg never deletes "
                    "them, even with --force: choose a new or empty directory", path=final)


def _check_dir_target(final: str, force: bool) -> None:
    state, names = dir_state(final)
    if state == "file":
        if os.path.islink(final):
            raise EmaError("output is a symbolic link; give the directory it points to", path=final)
        raise EmaError("output exists and is not a directory (a directory output needs a directory path)", path=final)
    if state == "foreign":
        raise _foreign_error(final, names)
    if state == "ours" and not force:
        raise EmaError("output exists (use --force to overwrite)", path=final)


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
        self.path = os.path.join(parent, staging_name(base))
        try:
            if is_dir:
                os.mkdir(self.path)
        except OSError as e:
            raise EmaError(f"cannot create the output: {e.strerror}", path=parent) from None
        self.done = False
        self.final_files: list[str] = []

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
            self._commit_dir()
        elif not self.force:
            os.link(self.path, self.final)  # atomic, and never replaces an existing file
            os.unlink(self.path)
        else:
            os.replace(self.path, self.final)
        _fsync_dir(parent)
        self.done = True

    def _commit_dir(self) -> None:
        """Write the marker, then: onto a missing or empty directory, one rename
        (which fails if the directory became non-empty meanwhile); onto a
        previous ema-avg output (``--force``), an atomic exchange
        (``renameat2(RENAME_EXCHANGE)``, else two renames), then the old
        output's own files are deleted, and nothing else."""
        files = sorted(os.path.relpath(os.path.join(root, f), self.path)
                       for root, _dirs, fs in os.walk(self.path) for f in fs)
        with open(os.path.join(self.path, MARKER), "w") as fh:
            json.dump({"tool": "ema-avg", "note": "files written by ema-avg; --force replaces exactly these",
                       "files": files}, fh, indent=1)
            fh.write("\n")
        _fsync_tree(self.path)
        state, names = dir_state(self.final)
        if state == "file":
            raise EmaError("output exists and is not a directory", path=self.final)
        if state == "foreign":
            raise _foreign_error(self.final, names)
        if state in ("missing", "empty"):
            try:
                os.rename(self.path, self.final)  # replaces an empty directory, never a non-empty one
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(self.final) from None
                raise
            self.final_files = [os.path.join(self.final, f) for f in files]
            return
        if not self.force:
            raise FileExistsError(self.final)
        if _exchange(self.path, self.final):
            old = self.path  # the previous output, now at the staging path
        else:
            old = self.path + ".old"
            os.rename(self.final, old)
            os.rename(self.path, self.final)
        self.final_files = [os.path.join(self.final, f) for f in files]
        _remove_output(old, self.final)

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


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the system or file system cannot."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove_output(old: str, final: str) -> None:
    """Delete a replaced ema-avg output: the files its marker lists, the marker,
    then the emptied directories.  Anything else found there (a file added
    between the check and the swap) is kept: the directory is renamed to a
    visible name beside the output, with a warning."""
    listed = _marker_files(old) or set()
    for f in sorted(listed):
        p = os.path.normpath(os.path.join(old, f))
        if p.startswith(old + os.sep) and os.path.isfile(p) and not os.path.islink(os.path.dirname(p)):
            try:
                os.unlink(p)
            except OSError:
                pass
    try:
        os.unlink(os.path.join(old, MARKER))
    except OSError:
        pass
    for root, _dirs, _files in sorted(os.walk(old, topdown=False), key=lambda t: -len(t[0])):
        try:
            os.rmdir(root)
        except OSError:
            pass
    if os.path.lexists(old):
        kept = f"{final}.ema-avg-kept-{token()}"
        try:
            os.rename(old, kept)
        except OSError:
            kept = old
        from ema_cli.notices import warn

        warn(f"files that appeared in {final} while it was replaced were kept in {kept}")
