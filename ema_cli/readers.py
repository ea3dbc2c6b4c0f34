"""Open readers, bounded: the pool every plan and task reads its inputs through.

``ReaderPool`` keeps at most ``max_open`` readers open (a quarter of the
descriptor limit), reopens them from their picklable ``Source`` when needed
again, and turns a descriptor limit that is really hit into one error line
naming the file and the limit.  A shard task anywhere opens a pool of its own.
"""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from contextlib import contextmanager

from ema_cli import formats
from ema_cli.errors import EmaError
from ema_cli.formats.base import Reader, Source, TensorInfo

_FD_LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)


def open_files_limit() -> int | None:
    """The soft limit on open file descriptors (``ulimit -n``), None if unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def default_max_open() -> int:
    """How many readers a ReaderPool keeps open: a quarter of the descriptor
    limit (a reader may hold several: HDF5, TF shards; the writer and Python
    need some too), at most 256."""
    limit = open_files_limit()
    return 256 if limit is None else max(1, min(256, limit // 4))


def fd_limit_error(path: str | None, err: BaseException | None = None) -> EmaError:
    """The one-line error for a descriptor limit that was really hit."""
    if isinstance(err, OSError) and err.errno == errno.ENFILE:
        return EmaError("cannot open: the system-wide limit on open files is reached "
                        "(fs.file-max); close other programs or raise it (sysctl fs.file-max)", path=path)
    limit = open_files_limit()
    now = f" is {limit}" if limit is not None else ""
    return EmaError(f"cannot open: too many open files (this process's limit, ulimit -n{now}); "
                    "raise it with 'ulimit -n 65536' (or ask for a higher hard limit) and run again", path=path)


def _is_fd_limit(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in _FD_LIMIT_ERRNOS:
        return True
    text = str(err)  # formats wrap the OSError (h5py, TensorFlow): look at the message
    return isinstance(err, (OSError, EmaError)) and ("Too many open files" in text or "errno = 24" in text)


class _Entry:
    __slots__ = ("reader", "leases")

    def __init__(self, reader: Reader):
        self.reader = reader
        self.leases = 0


class ReaderPool:
    """Readers by checkpoint path, opened lazily, at most ``max_open`` at a time.

    ``lease(source)`` yields an open reader that stays open for the block; the
    least recently used readers that no thread holds are closed when more than
    ``max_open`` are open (2,000 inputs with ``ulimit -n 1024``; memory stays
    bounded for formats that cache per file), and reopened when needed again.
    ``get(source)`` returns a handle whose every call runs under its own lease
    (a handle kept across calls never sees its reader closed under it).  When
    opening hits the descriptor limit anyway, the unleased readers are closed
    and the open retried once; then the error names the file and the limit."""

    def __init__(self, max_open: int | None = None):
        self.max_open = max_open or default_max_open()
        self._open: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}  # one opener per path at a time

    def get(self, source: Source) -> "PooledReader":
        return PooledReader(self, source)

    @contextmanager
    def lease(self, source: Source):
        entry = self._acquire(source)
        try:
            yield entry.reader
        finally:
            self._unlease(entry)

    def _unlease(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1

    def _acquire(self, source: Source) -> _Entry:
        path = source.path
        with self._lock:
            entry = self._open.get(path)
            if entry is not None:
                entry.leases += 1
                self._open.move_to_end(path)
                return entry
            opener = self._opening.setdefault(path, threading.Lock())
        with opener:
            with self._lock:  # another thread may have opened it meanwhile
                entry = self._open.get(path)
                if entry is not None:
                    entry.leases += 1
                    self._open.move_to_end(path)
                    return entry
                self._evict(self.max_open - 1)
            reader = self._open_reader(source)
            with self._lock:
                entry = self._open[path] = _Entry(reader)
                entry.leases += 1
                self._opening.pop(path, None)
            return entry

    def _open_reader(self, source: Source) -> Reader:
        try:
            return formats.open_reader(source)
        except (OSError, EmaError) as e:
            if not _is_fd_limit(e):
                raise
        self.make_room()
        try:
            return formats.open_reader(source)
        except (OSError, EmaError) as e:
            if _is_fd_limit(e):
                raise fd_limit_error(getattr(e, "filename", None) or source.path, e) from None
            raise

    def call(self, source: Source, method: str, *args):
        """``reader.method(*args)`` under a lease (no context manager: this runs
        once per tensor and input); a descriptor limit hit inside the call makes
        room and the call runs once more before the limit is reported."""
        for attempt in (0, 1):
            entry = self._acquire(source)
            try:
                return getattr(entry.reader, method)(*args)
            except (OSError, EmaError) as e:
                if not _is_fd_limit(e):
                    raise
                if attempt:
                    raise fd_limit_error(source.path, e) from None
            finally:
                self._unlease(entry)
            self.make_room()

    def read(self, source: Source, name: str):
        """One tensor of one checkpoint (``reader.read`` under a lease)."""
        return self.call(source, "read", name)

    def read_stream(self, source: Source, name: str):
        """One tensor as a flat array to stream through (``reader.read_stream``)."""
        return self.call(source, "read_stream", name)

    def make_room(self) -> None:
        """The descriptor limit was hit: close every reader no thread holds, and
        keep fewer open from now on."""
        with self._lock:
            self.max_open = max(1, min(self.max_open, len(self._open) // 2 or 1))
            self._evict(0)

    def _evict(self, keep: int) -> None:
        """Close least recently used, unleased readers until at most ``keep`` are open (lock held)."""
        if len(self._open) <= keep:
            return
        for path in list(self._open):
            if len(self._open) <= keep:
                break
            entry = self._open[path]
            if entry.leases == 0:
                del self._open[path]
                entry.reader.close()

    def prefetch(self, source: Source, name: str, first: int = 0, last: int | None = None) -> bool:
        """Let the reader start reading a tensor's elements ahead (``Reader.prefetch``;
        False: this reader does not read ahead)."""
        return bool(self.call(source, "prefetch", name, first, last))

    def release(self, source: Source, name: str, first: int = 0, last: int | None = None) -> None:
        """Let an open reader drop a tensor's mapped pages (see SafetensorsReader.release);
        a reader that is not open has nothing mapped to drop, so it is not reopened."""
        with self._lock:
            entry = self._open.get(source.path)
            if entry is None:
                return
            entry.leases += 1
        try:
            entry.reader.release(name, first, last)
        finally:
            with self._lock:
                entry.leases -= 1

    def open_count(self) -> int:
        return len(self._open)

    def close(self):
        with self._lock:
            entries = list(self._open.values())
            self._open.clear()
        for e in entries:
            e.reader.close()


class PooledReader:
    """A checkpoint's reader as ``ReaderPool.get`` hands it out: each call
    leases the reader from the pool (reopening it if it was closed to stay
    under the limit), so holding a handle costs no file descriptor.  A call
    that hits the descriptor limit (a format opening a file lazily) makes room
    in the pool and runs once more before the limit is reported."""

    def __init__(self, pool: ReaderPool, source: Source):
        self._pool = pool
        self.source = source

    def _call(self, method: str, *args):
        return self.__dict__["_pool"].call(self.__dict__["source"], method, *args)

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def format(self) -> str:
        return self.source.format

    def tensors(self) -> dict[str, TensorInfo]:
        return self._call("tensors")

    def read(self, name: str):
        return self._call("read", name)

    def metadata(self) -> dict[str, str]:
        return self._call("metadata")

    def step(self):
        return self._call("step")

    def role(self, info: TensorInfo):
        return self._call("role", info)

    def averaged_by_default(self, info: TensorInfo) -> bool:
        return self._call("averaged_by_default", info)

    def extras(self):
        return self._call("extras")

    def close(self) -> None:
        """The pool owns the reader: ``ReaderPool.close`` closes it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def read_flat(self, names: list[str]):
        return self._call("read_flat", names)

    def read_stream(self, name: str):
        return self._call("read_stream", name)

    def prefetch(self, name: str, first: int = 0, last: int | None = None) -> bool:
        return self._call("prefetch", name, first, last)

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        self._pool.release(self.source, name, first, last)
