"""Where checkpoints live: local paths or fsspec URLs.

Local paths (and ``file://`` URLs) keep the fast path: memory maps, ``pwrite``
and ``fsync``, staging beside the output and an atomic rename.  Any other URL
(``s3://``, ``gs://``, ``az://``, ``hf://``, ``memory://``, ...) goes through
fsspec, imported only then.  Credentials and endpoints come from the
filesystem's own configuration (environment variables, ``~/.aws``, fsspec's
``FSSPEC_<PROTOCOL>_<OPTION>`` variables); ``--storage-option KEY=VALUE``
gives the rest.  Storage options travel with the picklable ``Source`` and
output specs, so a Dask worker opens the same filesystem.
"""

from __future__ import annotations

import json
import os
import posixpath
import re

from ema_cli.errors import EmaError, UsageError

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_LOCAL = ("file", "local")
# the extra that brings each protocol's fsspec back-end
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def protocol(path: str) -> str | None:
    m = _URL.match(path)
    return m.group(1).lower() if m else None


def is_remote(path: str) -> bool:
    """A URL that is not a local file (``file://`` is local)."""
    p = protocol(path)
    return p is not None and p not in _LOCAL


def local_path(path: str) -> str:
    """A local path for ``path`` (``file://`` stripped), ``~`` expanded."""
    if protocol(path) in _LOCAL:
        path = path.split("://", 1)[1]
    return path


def absolute(path: str) -> str:
    """An absolute local path (``os.path.abspath``); a URL as it is."""
    return path if is_remote(path) else os.path.abspath(path)


def parse_options(items: list[str] | None) -> dict:
    """``--storage-option KEY=VALUE`` items as a dict: ``a.b=v`` nests
    (``client_kwargs.endpoint_url=...``); values read as JSON when they are
    (``true``, ``3``, ``{"k": 1}``), else as strings."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--storage-option takes KEY=VALUE (got {item!r})")
        try:
            v = json.loads(value)
        except ValueError:
            v = value
        d = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise UsageError(f"--storage-option {key}: {p} is given both as a value and as a group")
        d[parts[-1]] = v
    return out


def options_text(options: dict | None) -> str:
    """Storage options as the string a ``Source`` carries (picklable, hashable)."""
    return json.dumps(options or {}, sort_keys=True, separators=(",", ":"))


def filesystem(url: str, options: dict | str | None):
    """``(fs, path)`` for a URL: fsspec's filesystem with its own configuration
    plus ``options`` (each caller passes the options its source or output
    carries: nothing process-wide, so one library call's options never reach
    the next).  A missing back-end is a one-line hint."""
    if isinstance(options, str):
        options = json.loads(options) if options else {}
    try:
        import fsspec.core
    except ImportError:
        raise EmaError(f"{url}: remote storage needs fsspec: pip install 'ema-avg[{_extra(url)}]'") from None
    try:
        return fsspec.core.url_to_fs(url, **(options or {}))
    except ImportError as e:
        raise EmaError(f"{url}: no fsspec back-end for {protocol(url)}:// ({_first_line(e)}): "
                       f"pip install 'ema-avg[{_extra(url)}]'") from None
    except ValueError as e:
        raise EmaError(f"cannot use this URL: {_first_line(e)}", path=url) from None


def _extra(url: str) -> str:
    return _EXTRAS.get(protocol(url) or "", "s3")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def url(fs, path: str) -> str:
    """The URL of a path on ``fs`` (``fs.unstrip_protocol``)."""
    return fs.unstrip_protocol(path)


def join(base: str, *names: str) -> str:
    """A URL or local path joined with names."""
    if is_remote(base):
        head, rest = base.split("://", 1)
        return f"{head}://{posixpath.join(rest, *names)}"
    return os.path.join(base, *names)


def parent(path: str) -> str:
    if is_remote(path):
        head, rest = path.split("://", 1)
        return f"{head}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path.rstrip(os.sep))


def remote_error(e: BaseException, path: str, doing: str = "cannot read") -> EmaError:
    """One error line for a failed storage call (OSError, or the back-end's own:
    botocore's connection errors, ...)."""
    if isinstance(e, EmaError):
        return e
    if type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError",
                            "ClientConnectorError", "NoCredentialsError"):
        return EmaError(f"{doing}: {_first_line(e)} (check the endpoint and credentials: env vars, ~/.aws, "
                        "FSSPEC_<PROTOCOL>_<OPTION> or --storage-option)", path=path)
    if isinstance(e, FileNotFoundError):
        return EmaError("no such file or object", path=path)
    if isinstance(e, PermissionError):
        return EmaError(f"{doing}: permission denied ({_first_line(e)})", path=path)
    return EmaError(f"{doing}: {_first_line(e)}", path=path)


def write_object(url: str, data: bytes, *, force: bool, options: dict | str | None) -> None:
    """A small output (a JSON map) as one object: a single PUT, which an
    object store makes visible whole or not at all.  Without ``force`` an
    existing object is refused."""
    fs, p = filesystem(url, options)
    try:
        if fs.isdir(p):
            raise EmaError("output is a directory; expected a file path", path=url)
        if not force and fs.exists(p):
            raise EmaError("output exists (use --force to overwrite)", path=url)
        fs.pipe_file(p, data)
    except EmaError:
        raise
    except Exception as e:  # noqa: BLE001 - the back-end's own errors: one line
        raise remote_error(e, url, "cannot write") from None


def copy_file(src: str, dst: str, options: dict | str | None) -> None:
    """Copy one file between any two places (local or URLs), streaming."""
    import shutil

    try:
        if not is_remote(src) and not is_remote(dst):
            shutil.copyfile(local_path(src), local_path(dst))
            return
        if not is_remote(src):
            fs, p = filesystem(dst, options)
            fs.put_file(local_path(src), p)
            return
        fs, p = filesystem(src, options)
        if not is_remote(dst):
            fs.get_file(p, local_path(dst))
            return
        fs2, p2 = filesystem(dst, options)
        if fs2 is fs:
            fs.copy(p, p2)
            return
        with fs.open(p, "rb") as fi, fs2.open(p2, "wb") as fo:
            shutil.copyfileobj(fi, fo, 8 << 20)
    except Exception as e:  # noqa: BLE001 - the back-end's own errors too
        raise remote_error(e, src, "cannot copy") from None


class _Windows:
    """The fetch state of one remote byte range, shared by its dtype views:
    the current window and the one being fetched ahead."""

    __slots__ = ("get", "start", "nbytes", "window", "w0", "buf", "next")

    def __init__(self, get, start: int, nbytes: int, window: int):
        self.get = get  # get(first_byte, end_byte) -> bytes
        self.start = start
        self.nbytes = nbytes
        self.window = window
        self.w0 = 0
        self.buf = None
        self.next = None  # (first byte, future)
        self.ahead(0)  # the first window: fetched while the other inputs' are (one pool for all)

    def fetch(self, a: int) -> bytes:
        return self.get(self.start + a, self.start + min(self.nbytes, a + self.window))

    def ahead(self, a: int) -> None:
        if a < self.nbytes:
            self.next = (a, _prefetcher().submit(self.fetch, a))

    def bytes(self, a: int, b: int) -> memoryview:
        """Bytes ``[a, b)`` of the range (``b - a`` at most one window)."""
        buf = self.buf
        if buf is None or a < self.w0 or b > self.w0 + len(buf):
            nxt = self.next
            buf = nxt[1].result() if nxt is not None and nxt[0] == a else self.fetch(a)
            self.buf, self.w0, self.next = buf, a, None
            if b <= a + len(buf):  # read ahead: the next window while this one is summed
                self.ahead(a + len(buf))
        return memoryview(self.buf)[a - self.w0:b - self.w0]


class FlatStream:
    """A tensor's elements as a flat array-like for the kernel to stream through
    (``size``, ``dtype``, ``x[a:b]``, ``view``, ``reshape(-1)``), whose slices a
    subclass serves (``_slice``): ``RangeArray`` from ranged reads,
    ``tf_bundle.CheckedStream`` from a mapping once its checksum has covered them."""

    ndim = 1

    def __init__(self, dtype, size: int):
        import numpy as np

        self.dtype = np.dtype(dtype)
        self.size = size
        self.shape = (size,)

    def reshape(self, *shape):
        if shape in ((-1,), (self.size,), ((-1,),)):
            return self
        raise ValueError(f"{type(self).__name__} is flat: cannot reshape to {shape}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, s):
        if not isinstance(s, slice):
            raise TypeError(f"{type(self).__name__} takes slices")
        a, b, step = s.indices(self.size)
        if step != 1:
            raise ValueError(f"{type(self).__name__} takes contiguous slices")
        return self._slice(a, b)

    def _slice(self, a: int, b: int):
        raise NotImplementedError


class RangeArray(FlatStream):
    """A remote tensor's elements as a flat array-like the kernel streams
    through (``size``, ``dtype``, ``x[a:b]``, ``view``).  Slices are served from
    windows of about ``WINDOW`` bytes, each fetched with one ranged read; the
    first window is requested as soon as the array is made (so every input of
    a tensor is fetched at once) and each next one while the current one is
    summed.  Memory stays at two windows per input, whatever the tensor's size."""

    WINDOW = 16 << 20

    def __init__(self, get, start: int, size: int, dtype, window: int | None = None, _state=None):
        super().__init__(dtype, size)
        item = self.dtype.itemsize
        if _state is None:
            per = max(1, (window or self.WINDOW) // item)
            per = -(-per // 65536) * 65536  # whole kernel blocks: a block never straddles two windows
            _state = _Windows(get, start, size * item, per * item)
        self._w = _state

    def view(self, dtype) -> "RangeArray":
        import numpy as np

        dt = np.dtype(dtype)
        if dt.itemsize != self.dtype.itemsize:
            raise ValueError("RangeArray.view keeps the item size")
        return RangeArray(None, 0, self.size, dt, _state=self._w)

    def _slice(self, a: int, b: int):
        import numpy as np

        item = self.dtype.itemsize
        return np.frombuffer(self._w.bytes(a * item, b * item), dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        w = self._w
        arr = np.frombuffer(w.get(w.start, w.start + w.nbytes), dtype=self.dtype)
        return arr if dtype is None else arr.astype(dtype)


_pool = None


def _prefetcher():
    """The threads that read ahead for ``RangeArray`` (I/O: they wait on the network)."""
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ema-avg-prefetch")
    return _pool
