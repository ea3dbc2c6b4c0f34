"""safetensors: single files and Hugging Face sharded checkpoints.

Reading and writing are done here rather than with the ``safetensors``
package, because the package cannot meet three of our requirements:
``safe_open(..., framework="numpy").get_tensor`` copies every tensor out of the
file (we want zero-copy memory-mapped views) and fails on F8 dtypes, and
``save_file`` needs every tensor in memory at once (and in 0.8.0 corrupts
non-contiguous arrays).  The on-disk format is small: an 8-byte little-endian
header length, a JSON header, then the data.  Files written here are checked
against ``safe_open`` in the tests.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np

from ema_cli import dtypes, storage
from ema_cli.errors import EmaError
from ema_cli.notices import warn
from ema_cli.output import shown_path
from ema_cli.formats.base import Format, Reader, Source, TensorInfo, Writer, load_weight_map_index, step_from_scalar
from ema_cli.formats.base import is_training_state, step_hint

NAME = "safetensors"
SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER_SIZE = 100_000_000  # safetensors' own limit
STEP_NAMES = ("global_step", "step", "iteration", "iterations")

# safetensors dtype codes <-> canonical names
_CODES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64",
}
_NAMES = {v: k for k, v in _CODES.items()}
_ITEMSIZE = {v: dtypes.itemsize(v) for v in _CODES.values()}
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def can_store(dtype: str) -> bool:
    return dtype in _NAMES


# --------------------------------------------------------------------------- discovery


def is_output(path: str) -> bool:
    return path.endswith(SUFFIX) or path.endswith(INDEX_SUFFIX)


def _sharded_source(index: Path) -> Source:
    files = _index_files(index)
    hint = index.parent.name if index.name.startswith("model") else index.name
    return Source(NAME, str(index), (str(index), *files), name_hint=hint)


def claim_path(path: Path, *, skip_missing: bool = False) -> list[Source] | None:
    name = path.name
    if path.is_file() and name.endswith(INDEX_SUFFIX):
        return [_sharded_source(path)]
    if path.is_file() and name.endswith(SUFFIX):
        if _SHARD_RE.search(name):
            # a shard: the checkpoint is the index that lists it
            for index in sorted(path.parent.glob("*" + INDEX_SUFFIX)):
                if name in {Path(f).name for f in _index_files(index)}:
                    return [_sharded_source(index)]
        hint = step_hint(name, name[: -len(SUFFIX)], path.parent.name)
        return [Source(NAME, str(path), (str(path),), name_hint=hint)]
    return None


def scan_dir(path: Path) -> list[Source]:
    indexes = sorted(path.glob("*" + INDEX_SUFFIX))
    out = [_sharded_source(i) for i in indexes]
    listed = {f for s in out for f in s.files}
    for f in sorted(path.glob("*" + SUFFIX)):
        if str(f) not in listed and f.is_file():
            out.extend(claim_path(f) or [])
    return out


def _index_files(index: Path) -> list[str]:
    weight_map = _load_index(index)["weight_map"]
    return [str(index.parent / f) for f in dict.fromkeys(weight_map.values())]


def _load_index(index: Path) -> dict:
    return load_weight_map_index(index, "safetensors index")


def _load_remote_index(fs, key: str) -> dict:
    url = storage.url(fs, key)
    try:
        text = fs.cat_file(key)
    except OSError as e:
        raise storage.remote_error(e, url) from None
    return load_weight_map_index(url, "safetensors index", text)


def _remote_sharded(fs, key: str) -> Source:
    url = storage.url(fs, key)
    weight_map = _load_remote_index(fs, key)["weight_map"]
    files = [storage.join(storage.parent(url), f) for f in dict.fromkeys(weight_map.values())]
    name = key.rsplit("/", 1)[-1]
    hint = storage.basename(storage.parent(url)) if name.startswith("model") else name
    return Source(NAME, url, (url, *files), name_hint=hint)


def claim_url(fs, key: str) -> list[Source] | None:
    """``claim_path`` for an object in remote storage (``key`` without protocol)."""
    name = key.rsplit("/", 1)[-1]
    url = storage.url(fs, key)
    if name.endswith(INDEX_SUFFIX):
        return [_remote_sharded(fs, key)]
    if not name.endswith(SUFFIX):
        return None
    parent = key.rsplit("/", 1)[0] if "/" in key else ""
    if _SHARD_RE.search(name):
        for index in sorted(fs.glob(f"{parent}/*{INDEX_SUFFIX}")):
            if name in {storage.basename(f) for f in _remote_sharded(fs, index).files}:
                return [_remote_sharded(fs, index)]
    hint = step_hint(name, name[: -len(SUFFIX)], parent.rsplit("/", 1)[-1])
    return [Source(NAME, url, (url,), name_hint=hint)]


def scan_url_dir(fs, key: str) -> list[Source]:
    """``scan_dir`` for a remote directory (prefix)."""
    try:
        entries = fs.ls(key, detail=True)
    except OSError as e:
        raise storage.remote_error(e, storage.url(fs, key)) from None
    files = sorted(e["name"] for e in entries if e.get("type") == "file")
    out = [_remote_sharded(fs, f) for f in files if f.endswith(INDEX_SUFFIX)]
    listed = {f for s in out for f in s.files}
    for f in files:
        if f.endswith(SUFFIX) and storage.url(fs, f) not in listed:
            out.extend(claim_url(fs, f) or [])
    return out


# --------------------------------------------------------------------------- Hugging Face directories

# What a Hugging Face checkpoint directory holds beside the weights.  Files a
# loader needs (``from_pretrained``: the model config, generation config,
# tokenizer / processor files, remote code, the model card) are copied into a
# directory output; the Trainer's training state is not (it describes the run,
# not the averaged model, and resuming from it would be wrong).
_LOADER_NAMES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "merges.txt", "preprocessor_config.json",
    "processor_config.json", "adapter_config.json", "README.md",
})
_LOADER_PATTERNS = ("vocab.*", "*.model", "*.tiktoken", "chat_template.*", "*.py")


def is_loader_file(name: str) -> bool:
    """A non-tensor file ``from_pretrained`` reads beside the weights."""
    import fnmatch

    return name in _LOADER_NAMES or any(fnmatch.fnmatchcase(name, p) for p in _LOADER_PATTERNS)


def loader_files(directory: str, checkpoint_files) -> tuple[list[str], list[str]]:
    """For a directory output, from the newest checkpoint's ``directory``:
    (files to copy, names left out).  Copied: the loader files.  Not copied and
    not mentioned: the checkpoint's own files, other ``.safetensors`` checkpoints
    and index files, training state, hidden files.  Everything else (other
    weights such as ``pytorch_model.bin``, unknown files, sub-directories) is
    left out and named, so the caller can warn."""
    own = {os.path.abspath(f) for f in checkpoint_files}
    copies, left_out = [], []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise EmaError(f"cannot list: {e.strerror}", path=directory) from None
    for e in entries:
        name = e.name
        if name.startswith(".") or os.path.abspath(e.path) in own or is_training_state(name):
            continue
        if e.is_dir():
            left_out.append(name + "/")
        elif name.endswith(SUFFIX) or name.endswith(INDEX_SUFFIX):
            continue
        elif e.is_file() and is_loader_file(name):
            copies.append(e.path)
        else:
            left_out.append(name)
    return copies, left_out


def _remote_loader_files(newest: Source) -> tuple[list[str], list[str]]:
    """``loader_files`` for a checkpoint in remote storage (URLs to copy)."""
    directory = storage.parent(newest.path)
    fs, key = storage.filesystem(directory, dict(newest.options).get("storage_options", ""))
    own = set(newest.files)
    copies, left_out = [], []
    try:
        entries = sorted(fs.ls(key, detail=True), key=lambda e: e["name"])
    except OSError as e:
        raise storage.remote_error(e, directory, "cannot list") from None
    for e in entries:
        url = storage.url(fs, e["name"])
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".") or url in own or is_training_state(name):
            continue
        if e.get("type") == "directory":
            left_out.append(name + "/")
        elif name.endswith(SUFFIX) or name.endswith(INDEX_SUFFIX):
            continue
        elif is_loader_file(name):
            copies.append(url)
        else:
            left_out.append(name)
    return copies, left_out


# --------------------------------------------------------------------------- reading


MAX_DIMS = 64  # numpy's limit on the number of dimensions
_FD_LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)


class _Map:
    """A read-only shared mapping of a whole file that holds no file descriptor.

    ``mmap.mmap`` keeps a duplicate of the descriptor open for as long as the
    map lives (until Python 3.13's ``trackfd=False``), so every mapped file
    would cost one descriptor: 2,000 inputs, or 200 checkpoints of 10 shards,
    hit ``ulimit -n 1024``.  On Linux the map is made with libc's ``mmap``
    directly and the descriptor is closed right away (the mapping stays
    valid).  ``view`` is a read-only buffer over the file; the mapping is
    removed when the last numpy view of it is gone (``close`` only drops this
    object's reference), so a view outliving ``close`` stays valid."""

    _libc = None  # ctypes libc with mmap/munmap/madvise, False when unavailable
    _devices: dict[int, tuple[int, int]] = {}  # per device (st_dev): device_read_ahead
    # A page fault on a mapping reads read_ahead_kb around the page.  Measured on
    # 8 interleaved inputs from a cold virtio disk (bench_cold, 2 threads): with
    # read_ahead_kb 128 (the kernel's default), explicit read-ahead took 1.2x
    # cat's time against 1.5-1.8x without; with 1024, 4096 or 8192 it was slower
    # than the faults alone (1.3x against 1.0-1.2x).  So from 1 MiB on the kernel
    # is left to do it.
    KERNEL_READS_AHEAD = 1 << 20

    def __init__(self, fd: int, size: int):
        self.addr = None
        self._mm = None
        ra, most = _Map.device_read_ahead(fd)
        self.step = max(ra, most)  # what one MADV_WILLNEED reads (see willneed)
        self.explicit = ra < _Map.KERNEL_READS_AHEAD
        libc = self._load()
        if libc:
            import ctypes

            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))

            class _Mapped(ctypes.c_char * size):
                def __del__(self, _munmap=libc.munmap, _addressof=ctypes.addressof, _sizeof=ctypes.sizeof):
                    _munmap(_addressof(self), _sizeof(self))

            self.addr = addr
            self.view = memoryview(_Mapped.from_address(addr)).cast("B").toreadonly()
        elif sys.version_info >= (3, 13):
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ, trackfd=False)
            self.view = self._mm
        else:  # holds a descriptor (non-Linux, Python < 3.13)
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            self.view = self._mm

    @classmethod
    def _load(cls):
        if cls._libc is None:
            cls._libc = False
            if sys.platform.startswith("linux"):
                try:
                    import ctypes

                    libc = ctypes.CDLL(None, use_errno=True)
                    libc.mmap.restype = ctypes.c_void_p
                    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_int, ctypes.c_int64)
                    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
                    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                    cls._libc = libc
                except (OSError, AttributeError):
                    pass
        return cls._libc

    @classmethod
    def device_read_ahead(cls, fd: int) -> tuple[int, int]:
        """(read_ahead_kb, max_sectors_kb) of this file's block device, in bytes,
        from sysfs, once per device; (128 KiB, 128 KiB), the kernel's defaults,
        where they cannot be read (overlay, network file systems, non-Linux)."""
        try:
            dev = os.fstat(fd).st_dev
        except OSError:
            return 128 << 10, 128 << 10
        got = cls._devices.get(dev)
        if got is None:
            got = (128 << 10, 128 << 10)
            base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
            for queue in (base + "/queue", base + "/../queue"):  # a disk, or a partition's disk
                try:
                    with open(queue + "/read_ahead_kb") as ra, open(queue + "/max_sectors_kb") as ms:
                        got = (int(ra.read()) << 10, max(4, int(ms.read())) << 10)
                    break
                except (OSError, ValueError):
                    continue
            cls._devices[dev] = got
        return got

    def willneed(self, begin: int, end: int) -> bool:
        """Bytes ``[begin, end)`` will be read soon: ``MADV_WILLNEED`` over their
        pages starts reading them from disk (in the background) where they are
        not in the page cache; a no-op where they are.  Returns False, and asks
        for nothing, where the kernel reads ahead well enough by itself (see
        ``KERNEL_READS_AHEAD``) or the platform has no MADV_WILLNEED.

        Linux reads at most max(read_ahead_kb, max_sectors_kb) per call and
        drops the rest of a larger request, so the range is asked for in steps
        of that (``step``)."""
        if not self.explicit or not hasattr(mmap, "MADV_WILLNEED"):
            return False
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE
        for a in range(start, end, self.step):
            self.advise(mmap.MADV_WILLNEED, a, min(self.step, end - a))
        return True

    def advise(self, advice: int, start: int, length: int) -> None:
        """madvise over [start, start + length) (page-aligned start); a hint."""
        if self.view is None:
            return
        if self.addr is not None:
            self._libc.madvise(self.addr + start, length, advice)
        elif self._mm is not None:
            try:
                self._mm.madvise(advice, start, length)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self.view = None  # the mapping goes with the last view (libc path)
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views still alive; the map is released with them
            self._mm = None


class _File:
    """One .safetensors file: validated header and a read-only map of its data.

    ``infos``: name -> TensorInfo in data order; ``begin``: name -> offset of
    the tensor in the data section.  The file descriptor is closed as soon as
    the file is mapped."""

    def __init__(self, path: str):
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            if e.errno in _FD_LIMIT_ERRNOS:
                e.filename = path
                raise  # the reader pool makes room and retries, or explains the limit
            raise EmaError(f"cannot open: {e.strerror}", path=path) from None
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise EmaError(f"truncated: {size} bytes, no safetensors header", path=path)
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if n > MAX_HEADER_SIZE:
                raise EmaError(
                    f"header length {n} is over safetensors' limit of {MAX_HEADER_SIZE} bytes",
                    path=path,
                )
            if 8 + n > size:
                raise EmaError(f"header length {n} is larger than the file ({size} bytes)", path=path)
            raw = os.pread(fd, n, 8)
            self.data_start = 8 + n
            self.data_len = size - self.data_start
            self.infos, self.meta = _parse_header(raw, self.data_len, path)
            del raw
            # (no MADV_SEQUENTIAL: with two threads reading different tensors of a file it
            # made the kernel's read-ahead smaller; measured 1.18x cat's time against 0.94x)
            self.map = _Map(fd, size)
        except OSError as e:
            if e.errno in _FD_LIMIT_ERRNOS:
                e.filename = path
                raise
            raise EmaError(f"cannot read: {e.strerror}", path=path) from None
        finally:
            os.close(fd)

    @property
    def header(self) -> dict[str, TensorInfo]:
        return self.infos

    def read(self, name: str) -> np.ndarray:
        info = self.infos[name]
        dt = dtypes.storage_numpy(info.dtype)  # (bfloat16: its uint16 bits, Reader.reads_bits)
        view = self.map.view
        if view is None:
            raise EmaError("internal: read after close", path=self.path, tensor=name)
        arr = np.frombuffer(view, dtype=dt, count=info.numel, offset=self.data_start + info.offset)
        return arr.reshape(info.shape)

    def _bytes(self, name: str, first: int, last: int | None) -> tuple[int, int]:
        """File offsets of elements ``[first, last)`` of tensor ``name``."""
        info = self.infos[name]
        begin = info.offset
        end = begin + info.nbytes
        if last is not None:
            item = dtypes.itemsize(info.dtype)
            begin, end = begin + first * item, begin + min(last, info.numel) * item
        return self.data_start + begin, self.data_start + end

    def prefetch(self, name: str, first: int = 0, last: int | None = None) -> bool:
        """Elements ``[first, last)`` will be read soon (``_Map.willneed``)."""
        return self.map.willneed(*self._bytes(name, first, last))

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """Done with this tensor (or with its elements ``[first, last)``): drop
        their pages from this process's page tables (``MADV_DONTNEED``; they stay
        in the page cache, and a later read maps them again).  The resident set
        then stays small whatever the file or tensor size, and closing does not
        have to unmap gigabytes at the end.  Whole pages inside the range only;
        ranges under 512 KiB are left alone."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self._bytes(name, first, last)
        start = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
        stop = end // mmap.PAGESIZE * mmap.PAGESIZE
        if stop - start >= 1 << 19:
            self.map.advise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self):
        self.map.close()


    def span(self, offset: int, count: int, dt) -> np.ndarray:
        """``count`` elements of dtype ``dt`` from data offset ``offset``: a view."""
        view = self.map.view
        if view is None:
            raise EmaError("internal: read after close", path=self.path)
        return np.frombuffer(view, dtype=dt, count=count, offset=self.data_start + offset)

    def read_stream(self, name: str):
        return self.read(name).reshape(-1)


class _RemoteFile:
    """One remote .safetensors object, read with ranged requests: the header
    first (one request for its first 64 KiB, a second only for a longer
    header), then only the byte ranges of the tensors that are read.  Large
    tensors stream window by window (``storage.RangeArray``).  Nothing is
    downloaded whole."""

    HEAD = 1 << 16
    STREAM = 16 << 20  # tensors from this size on are read window by window

    def __init__(self, url: str, options: str = ""):
        self.path = url
        self.fs, self.key = storage.filesystem(url, options)
        try:
            size = self.fs.size(self.key)
            first = self.fs.cat_file(self.key, start=0, end=min(size, self.HEAD))
        except Exception as e:  # noqa: BLE001 - the back-end's own errors too (botocore): one line
            raise storage.remote_error(e, url) from None
        if size < 8:
            raise EmaError(f"truncated: {size} bytes, no safetensors header", path=url)
        (n,) = struct.unpack("<Q", first[:8])
        if n > MAX_HEADER_SIZE:
            raise EmaError(f"header length {n} is over safetensors' limit of {MAX_HEADER_SIZE} bytes", path=url)
        if 8 + n > size:
            raise EmaError(f"header length {n} is larger than the file ({size} bytes)", path=url)
        raw = first[8:8 + n] if 8 + n <= len(first) else first[8:] + self._get(len(first), 8 + n)
        self.data_start = 8 + n
        self.data_len = size - self.data_start
        self.infos, self.meta = _parse_header(raw, self.data_len, url)

    def _get(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""  # (an empty range is not a valid HTTP range)
        try:
            return self.fs.cat_file(self.key, start=start, end=end)  # (keywords: s3fs takes version_id second)
        except Exception as e:  # noqa: BLE001
            raise storage.remote_error(e, self.path) from None

    def read(self, name: str) -> np.ndarray:
        info = self.infos[name]
        return self.span(info.offset, info.numel, dtypes.storage_numpy(info.dtype)).reshape(info.shape)

    def span(self, offset: int, count: int, dt) -> np.ndarray:
        dt = np.dtype(dt)
        start = self.data_start + offset
        return np.frombuffer(self._get(start, start + count * dt.itemsize), dtype=dt, count=count)

    def read_stream(self, name: str):
        info = self.infos[name]
        if info.nbytes < self.STREAM:
            return self.read(name).reshape(-1)
        return storage.RangeArray(self._get, self.data_start + info.offset, info.numel,
                                  dtypes.storage_numpy(info.dtype))

    def prefetch(self, name: str, first: int = 0, last: int | None = None) -> bool:
        return False  # RangeArray reads ahead itself

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        pass  # nothing is mapped

    def close(self) -> None:
        pass


def _open_file(path: str, options: str = ""):
    return _RemoteFile(path, options) if storage.is_remote(path) else _File(storage.local_path(path))


def _bad_header(message: str, path: str, name: str | None = None) -> EmaError:
    return EmaError(message, path=path, tensor=name)


def _short(value, limit: int = 80) -> str:
    """A value from a header, for an error message: at most ``limit`` characters."""
    text = repr(value) if not isinstance(value, list) or len(value) <= 16 else \
        f"[{', '.join(map(repr, value[:8]))}, ... ({len(value)} items)]"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# One tensor entry as safetensors' own writer (serde_json, compact) and
# json.dumps(separators=(",", ":")) lay it out: the fast path of _parse_header.
_ENTRY = re.compile(r'"((?:[^"\\\x00-\x1f]|\\.)*)":\{"dtype":"([^"\\]*)","shape":\[((?:(?:0|[1-9][0-9]*)'
                    r'(?:,(?:0|[1-9][0-9]*))*)?)\],"data_offsets":\[(0|[1-9][0-9]*),(0|[1-9][0-9]*)\]\}(,|\}\s*$)')
_METADATA_HEAD = '{"__metadata__":'


def _fast_entries(text: str):
    """``(metadata, [(name, code, shape, begin, end), ...])`` for a header in the
    canonical compact layout, or None (then ``json`` parses it): a header may
    list millions of tensors, and ``json.loads`` would first build a dict and two
    lists per tensor.  The matches must tile the text, so nothing is skipped."""
    pos, meta = 1, {}
    if not text.startswith("{"):
        return None
    if text.startswith(_METADATA_HEAD):
        try:
            meta, pos = json.JSONDecoder().raw_decode(text, len(_METADATA_HEAD))
        except (ValueError, RecursionError):
            return None
        if not text.startswith(",", pos):
            return None if text[pos:].strip() != "}" else (meta, [])
        pos += 1
    elif text.rstrip() == "{}":
        return meta, []
    out = []
    match, loads = _ENTRY.match, json.loads
    while True:
        m = match(text, pos)
        if m is None:
            return None
        name, code, dims, b, e, last = m.groups()
        if "\\" in name:
            name = loads(f'"{name}"')
        out.append((name, code, tuple(map(int, dims.split(","))) if dims else (), int(b), int(e)))
        if last != ",":
            return meta, out
        pos = m.end()


def _json_entries(raw: bytes, path: str):
    """``(metadata, entries)`` through ``json`` (any valid layout), checked
    member by member as safetensors checks them."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise EmaError("garbage header: the JSON header is nested too deeply", path=path) from None
    except (UnicodeDecodeError, ValueError):
        raise EmaError("garbage header: not a safetensors JSON header", path=path) from None
    if not isinstance(doc, dict):
        raise EmaError("garbage header: the JSON header is not an object", path=path)
    meta = doc.pop("__metadata__", None)
    out = []
    # popitem frees each parsed entry as it is converted (last first; the order is restored below)
    while doc:
        name, e = doc.popitem()
        if type(e) is not dict:
            raise _bad_header("header entry is not an object", path, name)
        code, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if type(code) is not str or code not in _CODES:
            raise _bad_header(f"unknown dtype {_short(code)}", path, name)
        if type(shape) is not list:
            raise _bad_header(f"invalid shape {_short(shape)}", path, name)
        if len(shape) > MAX_DIMS:
            raise _bad_header(f"shape has {len(shape)} dimensions (at most {MAX_DIMS} are supported)", path, name)
        for d in shape:
            if type(d) is not int or d < 0:
                raise _bad_header(f"invalid shape {_short(shape)}", path, name)
        if not (type(offs) is list and len(offs) == 2 and type(offs[0]) is int and type(offs[1]) is int
                and offs[0] >= 0 and offs[1] >= 0):
            raise _bad_header(f"invalid data_offsets {_short(offs)}", path, name)
        out.append((name, code, tuple(shape), offs[0], offs[1]))
    out.reverse()
    return meta, out


def _parse_header(raw: bytes, data_len: int, path: str):
    """The validated header: ``(infos, metadata)``, each TensorInfo carrying its
    byte offset.  Linear in the header (one pass over the entries, then one
    O(n log n) sort by offset for the overlap check); per tensor, only its
    TensorInfo is kept."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EmaError("garbage header: not a safetensors JSON header", path=path) from None
    fast = _fast_entries(text)
    del text
    meta, entries = fast if fast is not None else _json_entries(raw, path)
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then look for a lone surrogate (not UTF-8: the library refuses it)
        for e in entries:
            try:
                e[0].encode("utf-8")
            except UnicodeEncodeError:
                raise _bad_header("the name is not valid Unicode (a lone surrogate)", path, e[0]) from None
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise EmaError("__metadata__ must map strings to strings", path=path)
    codes, itemsize, prod, intern = _CODES, _ITEMSIZE, math.prod, sys.intern
    infos_l: list[TensorInfo] = []
    begins: list[int] = []
    ends: list[int] = []
    # checkpoints of one model repeat the same names and shapes: one string per
    # name (interned, shared with the other inputs' readers), one tuple per shape
    shapes: dict[tuple, tuple] = {}
    for i in range(len(entries)):
        name, code, shape, begin, end = entries[i]
        entries[i] = None  # (freed as converted)
        name = intern(name)
        shape = shapes.setdefault(shape, shape)
        dt = codes.get(code)
        if dt is None:
            raise _bad_header(f"unknown dtype {_short(code)}", path, name)
        if len(shape) > MAX_DIMS:
            raise _bad_header(f"shape has {len(shape)} dimensions (at most {MAX_DIMS} are supported)", path, name)
        numel = prod(shape)
        nbytes = numel * itemsize[dt]
        if end - begin != nbytes:
            raise _bad_header(f"data_offsets {_short([begin, end])} do not hold {nbytes} bytes for shape "
                              f"{_short(list(shape))} {code}", path, name)
        if end > data_len:
            raise _bad_header(
                f"truncated: data ends at byte {data_len} but the tensor needs bytes {begin}..{end}", path, name)
        if numel == 0 and prod(d for d in shape if d) * itemsize[dt] >= 1 << 63:
            # empty, but numpy cannot even describe it
            raise _bad_header(f"shape {_short(list(shape))} is too large", path, name)
        infos_l.append(TensorInfo(name, dt, shape, begin))
        begins.append(begin)
        ends.append(end)
    del entries
    n = len(infos_l)
    # tensors must not overlap (they may leave no holes either, as safetensors demands):
    # sorted by start (ties in header order), each must start where the previous ended
    b = np.array(begins, dtype=np.int64)
    del begins
    e_ = np.array(ends, dtype=np.int64)
    del ends
    order = np.lexsort((e_, b))  # stable: by start, then end, then header order
    sb, se = b[order], e_[order]
    if n:
        prev_end = np.concatenate(([0], se[:-1]))
        bad = np.flatnonzero(sb != prev_end)
        if bad.size:
            i = int(bad[0])
            name = infos_l[int(order[i])].name
            if sb[i] < prev_end[i]:
                raise EmaError(f"data overlaps tensor {infos_l[int(order[i - 1])].name!r}", path=path, tensor=name)
            raise EmaError(f"hole in the data before byte {int(sb[i])}", path=path, tensor=name)
    pos = int(se[-1]) if n else 0
    if pos != data_len:
        raise EmaError(
            f"{data_len - pos} bytes of data after the last tensor (corrupt or not safetensors)",
            path=path,
        )
    # in data order, which is the order the writer laid them out
    infos = {}
    for i in order.tolist():
        info = infos_l[i]
        infos[info.name] = info
    if len(infos) != n:  # a name twice (the fast path sees every member; json would keep the last)
        raise EmaError("duplicate tensor names in the header", path=path)
    return infos, meta


class SafetensorsReader(Reader):
    """Zero-copy views of memory-mapped files (ranged reads for URLs); bfloat16
    tensors as their uint16 bits (``reads_bits``: no ml_dtypes)."""

    format = NAME
    reads_bits = True

    def __init__(self, source: Source):
        super().__init__(source)
        self._files: dict[str, _File] = {}
        self._where: dict[str, _File] | None = None  # sharded: tensor -> its shard
        self._meta: dict[str, str] = {}
        self._options = dict(source.options).get("storage_options", "")
        try:
            if source.path.endswith(INDEX_SUFFIX):
                self._open_sharded(source.path)
            else:
                f = _open_file(source.path, self._options)
                self._files[source.path] = f
                self._single = f
                self._tensors = f.infos  # shared, not copied
                self._meta = dict(f.meta)
        except BaseException:
            self.close()
            raise

    def _open_sharded(self, index: str) -> None:
        remote = storage.is_remote(index)
        if remote:
            fs, key = storage.filesystem(index, self._options)
            doc = _load_remote_index(fs, key)
        else:
            doc = _load_index(Path(index))
        for fname in dict.fromkeys(doc["weight_map"].values()):
            fpath = storage.join(storage.parent(index), fname)
            if not remote and not os.path.exists(fpath):
                raise EmaError(f"shard {fname} listed in the index is missing", path=self.source.path)
            try:
                self._files[fname] = _open_file(fpath, self._options)
            except EmaError as e:
                if remote and "no such file" in str(e):
                    raise EmaError(f"shard {fname} listed in the index is missing", path=self.source.path) from None
                raise
        where: dict[str, _File] = {}
        for tname, fname in doc["weight_map"].items():
            f = self._files[fname]
            if tname not in f.infos:
                raise EmaError(f"index places tensor in {fname}, which lacks it", path=self.source.path, tensor=tname)
            where[tname] = f
        for f in self._files.values():
            for tname in f.infos:
                if where.get(tname) is not f:
                    raise EmaError(f"{Path(f.path).name} holds a tensor the index does not list",
                                   path=self.source.path, tensor=tname)
        self._where = where
        self._single = None
        self._tensors = {t: f.infos[t] for t, f in where.items()}
        first = next(iter(self._files.values()), None)
        self._meta = dict(first.meta) if first else {}

    def _file(self, name: str) -> _File:
        return self._single if self._where is None else self._where[name]

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def read(self, name: str) -> np.ndarray:
        return self._file(name).read(name)

    def read_flat(self, names: list[str]) -> np.ndarray:
        """One zero-copy view when the tensors are neighbours in one file, in this
        order (as a model's small tensors usually are), else their concatenation."""
        f = self._file(names[0])
        infos = [f.infos.get(n) for n in names]
        if self._where is None or all(self._where.get(n) is f for n in names):
            first = infos[0]
            end, dt = first.offset, first.dtype
            for info in infos:
                if info is None or info.offset != end or info.dtype != dt:
                    break
                end += info.nbytes
            else:
                return f.span(first.offset, sum(i.numel for i in infos), dtypes.storage_numpy(dt))
        return super().read_flat(names)

    def read_stream(self, name: str):
        return self._file(name).read_stream(name)

    def prefetch(self, name: str, first: int = 0, last: int | None = None) -> bool:
        """The engine reads this tensor or part of it soon (see ``_File.prefetch``)."""
        return self._file(name).prefetch(name, first, last)

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """The engine is done with this tensor or part of it (see ``_File.release``)."""
        self._file(name).release(name, first, last)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def step(self) -> int | None:
        for n in STEP_NAMES:
            info = self._tensors.get(n)
            if info is not None and info.numel == 1:
                s = step_from_scalar(self.read(n))
                if s is not None:
                    return s
        return None

    def extras(self):
        return {"files": [f.path for f in self._files.values()]}

    def close(self) -> None:
        for f in self._files.values():
            f.close()


Reader = SafetensorsReader


# --------------------------------------------------------------------------- writing


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data[: 1 << 30], offset)
        data, offset = data[n:], offset + n


_WRITEBACK_MIN = 1 << 20  # tensors smaller than this are left to the final fsync
_sync_file_range = None  # libc's sync_file_range (Linux), False where unavailable


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): the disk works while later
    tensors are computed, and the final fsync, which still guarantees
    durability, finds little left to do.  Whole pages only (a page shared with
    a neighbour written later would go out twice).  A hint: errors are ignored."""
    global _sync_file_range
    if nbytes < _WRITEBACK_MIN:
        return
    fn = _sync_file_range
    if fn is None:
        fn = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = False
        _sync_file_range = fn
    if fn:
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            fn(fd, start, end - start, 2)  # SYNC_FILE_RANGE_WRITE (ctypes releases the GIL)


RECIPE_KEY = "ema_avg"  # the engine's recipe in the metadata


def _fit_header(metadata: dict, entries: list[str], shown: str) -> bytes:
    """The header's bytes (padded to 8), within the limit every safetensors reader
    enforces: when the recipe in the metadata pushes it over, the recipe loses its
    per-checkpoint list, then goes, each with a warning; a header that is over
    without it is an error (no reader could open the file).

    ``entries`` are the tensors' ``"name":{...}`` JSON members, already encoded
    (the same bytes ``json.dumps`` of the whole header gives): a dict of dicts
    and lists per tensor would take several hundred bytes each, and a header may
    list millions of tensors."""
    meta = metadata

    def encode() -> bytes:
        head = [f'"__metadata__":{json.dumps(meta, separators=(",", ":"))}'] if meta else []
        raw = ("{" + ",".join(head + entries) + "}").encode()
        return raw + b" " * (-len(raw) % 8)

    raw = encode()
    if len(raw) > MAX_HEADER_SIZE and RECIPE_KEY in meta:
        try:
            recipe = json.loads(meta[RECIPE_KEY])
            n = len(recipe.pop("checkpoints", []))
            recipe["checkpoints_left_out"] = n
            meta[RECIPE_KEY] = json.dumps(recipe, separators=(",", ":"))
        except (ValueError, AttributeError):
            del meta[RECIPE_KEY]
        raw = encode()
        if len(raw) > MAX_HEADER_SIZE:
            meta.pop(RECIPE_KEY, None)
            raw = encode()
            warn(f"{shown}: the recipe ({RECIPE_KEY} metadata) was left out: with it the header would exceed "
                 f"safetensors' limit of {MAX_HEADER_SIZE} bytes (use --json for the recipe)")
        else:
            warn(f"{shown}: the recipe ({RECIPE_KEY} metadata) lists no checkpoints: with them the header would "
                 f"exceed safetensors' limit of {MAX_HEADER_SIZE} bytes (use --json for them)")
    if len(raw) > MAX_HEADER_SIZE:
        raise EmaError(f"the output's header would be {len(raw)} bytes, over safetensors' limit of "
                       f"{MAX_HEADER_SIZE}: no reader could open it (split it with --max-shard-size)", path=shown)
    return raw


class _FileWriter(Writer):
    """Writes one safetensors file: the header first (every name, dtype and shape
    is known before any tensor is computed), then each tensor at its offset.
    One shard of a sharded output is one of these (``Format.open_shard``)."""

    writes_ranges = True
    writes_bits = True  # bfloat16 as uint16 bits (or ml_dtypes arrays): the bytes are the same

    def __init__(self, path: str, infos: list[TensorInfo], metadata: dict[str, str]):
        # largest item size first keeps every tensor aligned (as safetensors does)
        order = sorted(infos, key=lambda i: -dtypes.itemsize(i.dtype))
        self.offsets: dict[str, tuple[int, TensorInfo]] = {}
        entries: list[str] = []
        dumps = json.dumps
        pos = 0
        for info in order:
            code = _NAMES.get(info.dtype)
            if code is None:
                raise EmaError(f"safetensors cannot store dtype {info.dtype}", tensor=info.name)
            nb = info.nbytes
            entries.append(f'{dumps(info.name)}:{{"dtype":"{code}","shape":[{",".join(map(str, info.shape))}],'
                           f'"data_offsets":[{pos},{pos + nb}]}}')
            self.offsets[info.name] = (pos, info)
            pos += nb
        self.path = path
        self.shown = shown_path(path)  # the output the user named, for messages
        raw = _fit_header(dict(metadata), entries, self.shown)
        del entries
        self.data_start = 8 + len(raw)
        self.total = self.data_start + pos
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            if e.errno in _FD_LIMIT_ERRNOS:
                e.filename = self.shown
                raise  # the CLI explains the limit (engine.fd_limit_error)
            raise EmaError(f"cannot create: {e.strerror}", path=self.shown) from None
        try:
            _reserve(self.fd, self.total, self.shown)
            _pwrite_all(self.fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0)
        except OSError as e:
            os.close(self.fd)
            raise EmaError(f"cannot write: {e.strerror}", path=self.shown) from None
        except BaseException:
            os.close(self.fd)
            raise
        self.pending = set(self.offsets)

    def write(self, name: str, array: np.ndarray) -> None:
        pos, info = self.offsets[name]
        arr = dtypes.as_storage(array, info.dtype)
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            arr = arr.copy(order="C")
        if arr.shape != info.shape:
            raise EmaError(f"internal: shape {arr.shape} != {info.shape}", tensor=name)
        try:
            _pwrite_all(self.fd, memoryview(arr.reshape(-1).view(np.uint8)), self.data_start + pos)
            _start_writeback(self.fd, self.data_start + pos, info.nbytes)
        except OSError as e:
            raise EmaError(f"cannot write: {e.strerror}", path=self.shown, tensor=name) from None
        self.pending.discard(name)

    def write_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Whole tensors; neighbours in the file go out in one ``pwrite``."""
        parts: list[tuple[int, np.ndarray, str]] = []
        for name, array in items:
            pos, info = self.offsets[name]
            arr = dtypes.as_storage(array, info.dtype)
            if arr.shape != info.shape:
                raise EmaError(f"internal: shape {arr.shape} != {info.shape}", tensor=name)
            parts.append((pos, np.ascontiguousarray(arr.reshape(-1)).view(np.uint8), name))
        parts.sort(key=lambda t: t[0])
        i = 0
        while i < len(parts):
            j, end = i + 1, parts[i][0] + parts[i][1].size
            while j < len(parts) and parts[j][0] == end:
                end += parts[j][1].size
                j += 1
            start = parts[i][0]
            buf = parts[i][1] if j == i + 1 else np.concatenate([p[1] for p in parts[i:j]])
            try:
                _pwrite_all(self.fd, memoryview(buf), self.data_start + start)
                _start_writeback(self.fd, self.data_start + start, end - start)
            except OSError as e:
                raise EmaError(f"cannot write: {e.strerror}", path=self.shown, tensor=parts[i][2]) from None
            for p in parts[i:j]:
                self.pending.discard(p[2])
            i = j

    def write_range(self, name: str, start: int, flat: np.ndarray) -> None:
        """Elements ``[start, start + flat.size)`` of the tensor in C order (``flat``:
        1-D, contiguous, the tensor's dtype), copied to the file before returning.
        The range that ends at the tensor's last element completes it."""
        pos, info = self.offsets[name]
        dt = dtypes.storage_numpy(info.dtype)
        if flat.dtype != dt and flat.dtype.name == info.dtype:
            flat = flat.view(dt)  # (ml_dtypes' bfloat16: the same bytes)
        if flat.dtype != dt or flat.ndim != 1 or not flat.flags.c_contiguous or not 0 <= start <= info.numel - flat.size:
            raise EmaError(f"internal: bad range {start}+{flat.size} ({flat.dtype}) of {info.numel} {dt}", tensor=name)
        where = self.data_start + pos + start * dt.itemsize
        try:
            _pwrite_all(self.fd, memoryview(flat.view(np.uint8)), where)
            _start_writeback(self.fd, where, flat.nbytes)
        except OSError as e:
            raise EmaError(f"cannot write: {e.strerror}", path=self.shown, tensor=name) from None
        if start + flat.size == info.numel:
            self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            raise EmaError(f"internal: {len(self.pending)} tensors never written", path=self.shown)
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise EmaError(f"cannot write: {e.strerror}", path=self.shown) from None
        finally:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _reserve(fd: int, size: int, path: str) -> None:
    """Reserve the file's space up front, so a full disk fails before any work."""
    try:
        if hasattr(os, "posix_fallocate") and size:
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
    except OSError as e:
        raise EmaError(f"cannot reserve {size} bytes: {e.strerror}", path=path) from None


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def index_document(shard_infos: list[list[TensorInfo]], metadata: dict[str, str]) -> tuple[str, bytes]:
    """Hugging Face's ``model.safetensors.index.json`` for these shards (their
    files named by ``shard_file_names``): ``total_size`` and the weight map."""
    names = shard_file_names(len(shard_infos))
    weight_map = {}
    total = 0
    for fname, infos in zip(names, shard_infos):
        for info in infos:
            weight_map[info.name] = fname
            total += info.nbytes
    doc = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
    return "model" + INDEX_SUFFIX, (json.dumps(doc, indent=2) + "\n").encode()


class SafetensorsWriter(_FileWriter):
    """The format's writer (``Writer(path, shards, metadata, template=None)``):
    one file at ``path``.  A sharded output is written shard by shard, each by
    its own task (``SafetensorsFormat.open_shard``), and its index by the
    commit (``index_document``)."""

    def __init__(self, path: str, shards: list[list[TensorInfo]], metadata: dict[str, str], template=None):
        if len(shards) > 1:
            raise EmaError("internal: a sharded safetensors output is written through Format.open_shard",
                           path=shown_path(path))
        super().__init__(path, shards[0] if shards else [], metadata)


Writer = SafetensorsWriter


class SafetensorsFormat(Format):
    name = NAME
    reader = SafetensorsReader
    writer = SafetensorsWriter
    remote_reads = True
    shard_files = True

    claim_path = staticmethod(claim_path)
    scan_dir = staticmethod(scan_dir)
    is_output = staticmethod(is_output)
    can_store = staticmethod(can_store)
    claim_url = staticmethod(claim_url)
    scan_url_dir = staticmethod(scan_url_dir)

    def directory_name(self, shards, newest):
        return "" if shards > 1 else "model.safetensors"

    def loader_files(self, directory, newest):
        """The Hugging Face layout beside the weights: config, tokenizer, remote
        code; never training state.  Only from a safetensors input."""
        if newest.format != NAME:
            return [], []
        if storage.is_remote(newest.path):
            return _remote_loader_files(newest)
        return loader_files(directory, newest.files)

    shard_names = staticmethod(shard_file_names)

    def open_shard(self, path, infos, metadata):
        return _FileWriter(path, infos, metadata)

    index_document = staticmethod(index_document)


FORMAT = SafetensorsFormat()
