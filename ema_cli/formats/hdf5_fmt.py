"""HDF5: plain HDF5 files, Keras 3 ``.weights.h5`` and legacy Keras ``.h5``.

Every dataset is a tensor named by its path in the file, without the leading
``/`` (``layers/dense/vars/0``, ``model_weights/dense/dense/kernel``).  Files
are walked link by link without following soft or external links; external
and virtual datasets are refused: everything read comes from the file named.

dtypes: numeric datasets map to their numpy type; 2-byte opaque datasets with a
``dtype="bfloat16"`` attribute are bfloat16 (how Keras 3 stores them; float8
types use the same convention with their own name); in a legacy Keras file
(root attribute ``keras_version``) an untagged 2-byte opaque dataset is
bfloat16 too (Keras' legacy saver drops the attribute); variable-length and
fixed-length strings are ``string``.  Datasets of any other type (compound,
references, other opaque data) and empty dataspaces are not tensors: they are
listed under ``extras()["not_tensors"]`` and kept as they are when the output
is written from an HDF5 template.

Writing HDF5 from an HDF5 template (the newest input) copies the template file
and overwrites each dataset's values in place, so every group, attribute,
dataset name, order, dtype, chunking and filter stays; only a root attribute
``ema_avg`` (the recipe) is added.  When ``--dtype`` changes a dataset's type,
the file is rebuilt object by object instead (same groups, attributes and
creation properties; the changed datasets get the new type), so the output
holds no dead space.  From any other template, one dataset per tensor is
created at its name's path, plus root attributes for the metadata (``ema_avg``).

Memory: contiguous datasets are mapped in place; chunked ones of SPILL_MIN
bytes or more are decoded into a mapped temporary file; a dataset that declares
far more bytes than the file stores is refused (``Hdf5Reader._check_stored``).
Large tensors are written range by range (``Hdf5Writer.write_range``).

h5py is imported lazily: listing the format costs nothing for other formats.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import numpy as np

from ema_cli import dtypes
from ema_cli.errors import EmaError, UsageError
from ema_cli.formats.base import BUFFER, COUNTER, Format, OPTIMIZER, OTHER, PARAMETER, Reader, Role, Source, TensorInfo, Writer
from ema_cli.output import Staged, check_target, shown_path

NAME = "hdf5"
SUFFIXES = (".h5", ".hdf5")
SIGNATURE = b"\x89HDF\r\n\x1a\n"
OPTIMIZER_GROUPS = ("optimizer", "optimizer_weights")
LEGACY_COUNTERS = ("iteration", "iterations", "iter")  # optimizer_weights/<opt>/iteration
ROOT_COUNTERS = ("global_step", "step", "iteration", "iterations")
DTYPE_ATTR = "dtype"  # Keras 3: opaque 2-byte data + dtype="bfloat16"
SPARSE_MIN_BYTES = 64 << 20  # datasets over this size must store ...
SPARSE_RATIO = 16  # ... at least 1/16 of their declared bytes (see Hdf5Reader._check_stored)
SPILL_MIN = 64 << 20  # chunked datasets of this size are read through a mapped temporary file
ROW_BUFFER = 16 << 20  # Hdf5Writer.write_range buffers at most this many bytes per chunked dataset


def _h5py():
    import h5py

    return h5py


def _open(path: str, mode: str):
    """h5py.File, with file locking where the file system supports it."""
    h5py = _h5py()
    try:
        return h5py.File(path, mode, locking="best-effort")
    except ValueError as e:
        if "locking" not in str(e):
            raise
        return h5py.File(path, mode)  # an HDF5 library without best-effort locking


def _msg(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- discovery


def _has_suffix(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def is_output(path: str) -> bool:
    return _has_suffix(path)


def is_hdf5(path: Path) -> bool:
    """The HDF5 signature at byte 0 or at a user-block boundary (512, 1024, ...)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            off = 0
            while off + len(SIGNATURE) <= size:
                fh.seek(off)
                if fh.read(len(SIGNATURE)) == SIGNATURE:
                    return True
                off = 512 if off == 0 else off * 2
    except OSError:
        return False
    return False


_HEAP_MIN = 4096  # H5HG_MINSIZE: HDF5 never writes a smaller global heap collection


def check_global_heaps(path: str, base: int = 0, size: int | None = None, *, shown: str | None = None) -> None:
    """Variable-length data (strings, such as the ``dtype`` attributes of Keras 3
    bfloat16 weights) lives in global heap collections.  HDF5 parses a whole
    collection when it reads one object of it, and on a corrupt collection
    (H5HG__cache_heap_deserialize) loops forever on an object of size 0 or copies
    from past its end.  So every collection in the file (signature ``GCOL``,
    version 1) is parsed here first, as HDF5 does, before any such data is read.

    ``base``/``size``: the HDF5 image is bytes ``[base, base+size)`` of ``path``
    (a member stored in a ``.keras`` zip); ``shown`` names the file in errors.
    Byte positions in messages are relative to the image."""
    shown = shown or path
    try:
        with open(path, "rb") as fh:
            fsize = os.fstat(fh.fileno()).st_size
            end = fsize if size is None else min(fsize, base + size)
            if end <= base:
                return
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                problem = _scan_heaps(mm, base, end)
    except OSError as e:
        raise EmaError(f"cannot read: {e.strerror}", path=shown) from None
    if problem:
        raise EmaError(f"corrupt HDF5 file: {problem}", path=shown)


def check_global_heaps_stream(read, size: int, *, shown: str) -> None:
    """check_global_heaps for an image that can only be read front to back (a
    deflated zip member): one pass, holding at most one collection and 1 MiB."""
    buf = bytearray()
    start = 0  # image offset of buf[0]
    eof = False

    def fill(upto: int) -> bool:  # buf covers [start, upto): False at the end of the image
        nonlocal eof
        while start + len(buf) < upto and not eof:
            chunk = read(max(1 << 20, upto - start - len(buf)))
            if not chunk:
                eof = True
            buf.extend(chunk)
        return start + len(buf) >= upto

    fill(1 << 20)
    ls = _length_size(buf, 0, len(buf))
    hdr, objhdr = (8 + ls + 7) // 8 * 8, 8 + ls
    pos = 0
    while True:
        i = buf.find(b"GCOL\x01", pos - start)
        if i < 0:
            if eof:
                return
            keep = max(pos, start + len(buf) - 4)  # a signature may straddle two reads
            del buf[: keep - start]
            start = pos = keep
            fill(start + len(buf) + (1 << 20))
            continue
        pos = start + i
        del buf[: pos - start]
        start = pos
        fill(pos + 8 + ls)
        hsize = int.from_bytes(buf[8:8 + ls], "little") if len(buf) >= 8 + ls else 0
        if _HEAP_MIN <= hsize <= size - pos:
            fill(pos + hsize)
        problem = _heap_problem(buf, 0, len(buf), ls, hdr, objhdr, total=size - pos, shift=pos)
        if problem:
            raise EmaError(f"corrupt HDF5 file: global heap at byte {pos}: {problem}", path=shown)
        pos += 1


def _scan_heaps(mm, base: int, end: int) -> str | None:
    """The first global-heap problem in the HDF5 image at ``mm[base:end]``."""
    ls = _length_size(mm, base, end)
    hdr = (8 + ls + 7) // 8 * 8  # H5HG_SIZEOF_HDR: signature, version, reserved, size; aligned
    objhdr = 8 + ls  # H5HG_SIZEOF_OBJHDR: index, refcount, reserved, size
    pos = mm.find(b"GCOL\x01", base, end)
    while pos >= 0:
        problem = _heap_problem(mm, pos, end, ls, hdr, objhdr, shift=-base)
        if problem:
            return f"global heap at byte {pos - base}: {problem}"
        pos = mm.find(b"GCOL\x01", pos + 1, end)
    return None


def _length_size(mm, base: int, end: int) -> int:
    """The superblock's "size of lengths" (8 unless it says otherwise)."""
    off = 0
    while base + off + 16 <= end:
        if mm[base + off:base + off + 8] == SIGNATURE:
            v = mm[base + off + 8]
            n = mm[base + off + 14] if v in (0, 1) else mm[base + off + 10]
            return n if n in (2, 4, 8) else 8
        off = 512 if off == 0 else off * 2
    return 8


def _heap_problem(mm, pos: int, size: int, ls: int, hdr: int, objhdr: int, total: int | None = None,
                  shift: int = 0) -> str | None:
    """The collection at ``mm[pos:]``; ``size``: where the image ends in ``mm``
    (``total``: bytes the image has from ``pos``, when ``mm`` holds less;
    ``shift``: the image offset of ``mm[0]``, for messages)."""
    avail = (size - pos) if total is None else total
    hsize = int.from_bytes(mm[pos + 8:pos + 8 + ls], "little") if pos + 8 + ls <= size else 0
    if hsize < _HEAP_MIN or hsize > avail or pos + hsize > size:
        return f"collection size {hsize} (the file has {avail} bytes from there)"
    p = hdr
    while p < hsize:
        if p + objhdr > hsize:
            break  # the tail is too small for an object: free space
        idx = int.from_bytes(mm[pos + p:pos + p + 2], "little")
        osize = int.from_bytes(mm[pos + p + 8:pos + p + 8 + ls], "little")
        need = objhdr + (osize + 7) // 8 * 8 if idx > 0 else osize
        if need < objhdr or p + need > hsize:
            return f"object {idx} of {osize} bytes at byte {shift + pos + p} does not fit"
        p += need
    return None


def claim_path(path: Path, *, skip_missing: bool = False) -> list[Source] | None:
    path = Path(path)
    if not path.is_file():
        return None
    if _has_suffix(path.name):
        if not is_hdf5(path):
            if not os.access(path, os.R_OK):
                raise EmaError("cannot open: permission denied", path=str(path))
            raise EmaError("not an HDF5 file (no HDF5 signature)", path=str(path))
    elif not is_hdf5(path):
        return None  # .keras archives (zip) and everything else
    return [Source(NAME, str(path), (str(path),), name_hint=path.name)]


def scan_dir(path: Path) -> list[Source]:
    from ema_cli.formats.keras_fmt import shard_index

    out: list[Source] = []
    for f in sorted(Path(path).iterdir()):
        if _has_suffix(f.name) and f.is_file() and shard_index(f) is None:  # Keras shards: read by their index
            out.extend(claim_path(f) or [])
    return out


def make_staging(output: str, *, sharded: bool, force: bool) -> Staged:
    if sharded:
        raise UsageError("HDF5 output is a single file: --max-shard-size applies to safetensors output")
    check_target(output, force=force, is_dir=False)
    return Staged(output)


# --------------------------------------------------------------------------- dtypes


def _attr_str(v) -> str | None:
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            return None
    if isinstance(v, np.ndarray) and v.shape == () and v.dtype.kind in "SUO":
        return _attr_str(v[()])
    return v if isinstance(v, str) else None


def _attr_value(obj, name: str, guard=None):
    """An attribute's value; ``guard()`` first when it is variable-length data
    (read from a global heap: see check_global_heaps)."""
    if guard is not None and obj.attrs.get_id(name).dtype.hasobject:
        guard()
    return obj.attrs.get(name)


def _canonical(ds, legacy_keras: bool, guard=None) -> tuple[str | None, str]:
    """(canonical dtype, storage kind) of a dataset; dtype None: not a tensor.

    Storage kinds: "plain" (numpy type, HDF5 converts), "opaque" (raw bytes
    viewed as an ml_dtypes type), "enum" (integer enum, read as stored),
    "str" (h5py strings), "vlen-bytes" (vlen uint8 tagged dtype="string")."""
    h5py = _h5py()
    dt = ds.dtype
    tag = _attr_str(_attr_value(ds, DTYPE_ATTR, guard)) if DTYPE_ATTR in ds.attrs else None
    if dt.kind == "V" and dt.fields is None and dt.subdtype is None:  # opaque
        if tag and tag != "string" and dtypes.known(tag) and dtypes.itemsize(tag) == dt.itemsize:
            return tag, "opaque"
        if tag is None and legacy_keras and dt.itemsize == 2:
            return "bfloat16", "opaque"
        return None, f"opaque data of {dt.itemsize}-byte items" + (f" tagged {tag!r}" if tag else " without a dtype attribute")
    if h5py.check_string_dtype(dt) is not None or dt.kind in "SU":
        return "string", "str"
    vlen = h5py.check_vlen_dtype(dt)
    if vlen is not None:
        if np.dtype(vlen) == np.uint8 and tag == "string":
            return "string", "vlen-bytes"
        return None, "variable-length data"
    if dt.kind == "O" or dt.fields is not None or dt.subdtype is not None:
        return None, f"{dt} data"
    base = np.dtype(dt.str)  # drops h5py's enum metadata
    try:
        name = dtypes.from_numpy(base)
    except KeyError:
        return None, f"{dt} data"
    if h5py.check_enum_dtype(dt) is not None and base != np.bool_:
        return name, "enum"
    if base.kind == "f" and not ds.id.get_type().equal(h5py.h5t.py_create(base)):
        # h5py names any 2/4/8-byte float float16/32/64, but this one has another exponent,
        # mantissa or normalization: not a tensor (averages could not be stored back exactly)
        return None, f"{dt.itemsize}-byte floating-point data of a non-IEEE layout"
    return name, "plain"


def direct_offset(ds, dtype: str, kind: str) -> int | None:
    """The file offset of a dataset whose bytes are exactly the tensor's, in
    native order (contiguous, allocated, plain little-endian numbers or opaque
    bf16/f8): such data is mapped or written in place without h5py."""
    h5py = _h5py()
    if kind not in ("plain", "opaque") or dtype in ("string", "bool") or ds.shape is None:
        return None
    want = dtypes.to_numpy(dtype)
    if kind == "plain" and ds.dtype.str != want.str:
        return None  # other byte order: HDF5 converts
    if ds.dtype.itemsize != want.itemsize:
        return None
    dsid = ds.id
    if kind == "plain" and not dsid.get_type().equal(h5py.h5t.py_create(want)):
        # numpy's name hides the file's exact type (an integer of fewer bits, a float with
        # another exponent, mantissa or normalization): its bytes are not the values, HDF5 converts
        return None
    if dsid.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
        return None
    nbytes = int(np.prod(ds.shape, dtype=np.int64)) * want.itemsize
    # an unallocated dataset has no storage (and, with a user block, a bogus offset)
    if nbytes == 0 or dsid.get_storage_size() != nbytes:
        return None
    off = dsid.get_offset()
    return None if off is None else int(off)


def _storage_dtype(name: str) -> np.dtype:
    """How a canonical dtype is stored in a new dataset."""
    dt = dtypes.to_numpy(name)
    if name in dtypes.FLOATING and name not in ("float16", "float32", "float64"):
        return np.dtype(f"V{dt.itemsize}")  # opaque + dtype attribute (Keras 3 convention)
    return dt


def _needs_tag(name: str) -> bool:
    return _storage_dtype(name).kind == "V"


# --------------------------------------------------------------------------- reading


@dataclass
class Image:
    """Where a reader's HDF5 bytes are: bytes ``[base, base+size)`` of ``file``.

    A plain HDF5 file is the whole of its file (``base`` 0).  A member stored
    uncompressed in a zip (``.keras``) is a contiguous range of the zip: HDF5
    reads it through a file object restricted to that range, and contiguous
    datasets are still mapped in place (``base`` + their offset).  ``base`` None:
    the bytes are not in the file as they are (a deflated member), and are read
    front to back from ``stream()`` (zipfile's decompressing, seekable reader)."""

    file: str
    base: int | None
    size: int
    stream: Callable[[], IO[bytes]] | None = None

    @property
    def whole_file(self) -> bool:
        return self.base == 0 and self.stream is None and self.size == os.path.getsize(self.file)


class _Window(io.RawIOBase):
    """A read-only file object over bytes ``[base, base+size)`` of a file (pread:
    no shared file position); what h5py's file-object driver reads an HDF5
    image inside a zip through."""

    def __init__(self, path: str, base: int, size: int):
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._base, self._size, self._pos = base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        got = 0
        mv = memoryview(b)
        while got < n:
            k = os.preadv(self._fd, [mv[got:n]], self._base + self._pos + got)
            if k <= 0:
                break
            got += k
        self._pos += got
        return got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


class Hdf5Reader(Reader):
    format = NAME

    def __init__(self, source: Source, image: Image | None = None):
        super().__init__(source)
        self._heaps_checked = False
        self._fileobj = None
        self._layer_classes: dict[str, tuple[str, dict]] | None = None  # layer name -> (class, config)
        try:
            self._image = image or Image(source.path, 0, os.path.getsize(source.path))
            if self._image.whole_file:
                self._f = _open(source.path, "r")
            else:
                self._fileobj = (_Window(self._image.file, self._image.base, self._image.size)
                                 if self._image.base is not None else self._image.stream())
                self._f = _h5py().File(self._fileobj, "r")
        except (OSError, ValueError) as e:
            self._close_fileobj()
            raise EmaError(f"not a readable HDF5 file: {_msg(e)}", path=source.path) from None
        try:
            attrs = self._f.attrs
            self.legacy_keras = "keras_version" in attrs or "layer_names" in attrs or (
                "model_weights" in self._f and "keras_version" in self._f["model_weights"].attrs
            )
            self._tensors: dict[str, TensorInfo] = {}
            self._ds: dict[str, tuple[object, str]] = {}
            self.not_tensors: dict[str, str] = {}
            self._walk()
            recipe = _attr_str(_attr_value(self._f, "ema_avg", self.check_heaps)) if "ema_avg" in attrs else None
            self._meta = {"ema_avg": recipe} if recipe else {}
            self._offsets: dict[str, int | None] = {}
            self._mm = None
            self._map_lock = threading.Lock()
            self._size = self._image.size
        except EmaError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
            self.close()
            raise EmaError(f"corrupt HDF5 file: {_msg(e)}", path=source.path) from None

    def _close_fileobj(self) -> None:
        if self._fileobj is not None:
            try:
                self._fileobj.close()
            except Exception:  # noqa: BLE001 - best effort
                pass
            self._fileobj = None

    # ------------------------------------------------------------- the bytes

    def copy_image(self, dst: str) -> None:
        """Write this reader's HDF5 image, byte for byte, to a new file ``dst``."""
        img = self._image
        if img.whole_file:
            shutil.copyfile(img.file, dst)
            return
        with open(dst, "wb") as out:
            if img.base is not None:
                with open(img.file, "rb") as src:
                    left, off = img.size, img.base
                    while left > 0:
                        n = os.copy_file_range(src.fileno(), out.fileno(), left, off) if hasattr(os, "copy_file_range") else 0
                        if n <= 0:  # not supported here: plain reads
                            src.seek(off)
                            chunk = src.read(min(left, 1 << 20))
                            if not chunk:
                                raise EmaError("truncated while copying its HDF5 data", path=self.path)
                            out.write(chunk)
                            n = len(chunk)
                        left, off = left - n, off + n
            else:
                with img.stream() as src:
                    shutil.copyfileobj(src, out, 1 << 20)

    def image_head(self, n: int) -> bytes:
        """The first ``n`` bytes of the HDF5 image (a user block)."""
        img = self._image
        if img.base is not None:
            with open(img.file, "rb") as fh:
                fh.seek(img.base)
                return fh.read(min(n, img.size))
        with img.stream() as fh:
            return fh.read(n)

    def _walk(self) -> None:
        h5py = _h5py()
        seen_groups = set()

        def visit(group, prefix: str) -> None:
            for key in group:
                name = prefix + key
                link = group.get(key, getlink=True)
                if isinstance(link, h5py.SoftLink):
                    raise EmaError(f"soft link to {link.path!r}: ema-avg does not follow links",
                                   path=self.path, tensor=name)
                if isinstance(link, h5py.ExternalLink):
                    raise EmaError(f"external link to {link.filename}:{link.path}: ema-avg does not "
                                   "follow links out of the file", path=self.path, tensor=name)
                if not isinstance(link, h5py.HardLink):
                    raise EmaError("user-defined link: ema-avg does not follow links", path=self.path, tensor=name)
                obj = group[key]
                if isinstance(obj, h5py.Group):
                    if obj.id in seen_groups:  # a group linked twice (or a cycle)
                        continue
                    seen_groups.add(obj.id)
                    visit(obj, name + "/")
                elif isinstance(obj, h5py.Dataset):
                    self._add(name, obj)
                # committed datatypes are not tensors

        seen_groups.add(self._f["/"].id)
        visit(self._f, "")

    def _add(self, name: str, ds) -> None:
        if ds.is_virtual:
            raise EmaError("virtual dataset (its data lives in other files): not read", path=self.path, tensor=name)
        if ds.external:
            files = ", ".join(sorted({str(e[0]) for e in ds.external}))
            raise EmaError(f"dataset stored in external file(s) {files}: not read", path=self.path, tensor=name)
        if ds.shape is None:
            self.not_tensors[name] = "empty dataspace"
            return
        dt, kind = _canonical(ds, self.legacy_keras, self.check_heaps)
        if dt is None:
            self.not_tensors[name] = kind
            return
        self._tensors[name] = TensorInfo(name, dt, tuple(int(d) for d in ds.shape))
        self._ds[name] = (ds, kind)

    def check_heaps(self) -> None:
        """check_global_heaps, once, before the first variable-length read."""
        if not self._heaps_checked:
            img = self._image
            if img.base is not None:
                check_global_heaps(img.file, img.base, img.size, shown=self.path)
            else:
                try:
                    with img.stream() as fh:
                        check_global_heaps_stream(fh.read, img.size, shown=self.path)
                except OSError as e:
                    raise EmaError(f"cannot read: {_msg(e)}", path=self.path) from None
            self._heaps_checked = True

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def read(self, name: str) -> np.ndarray:
        ds, kind = self._ds[name]
        info = self._tensors[name]
        try:
            if info.dtype == "string":
                if ds.dtype.hasobject:
                    self.check_heaps()
                return _read_strings(ds, kind)
            dt = dtypes.to_numpy(info.dtype)
            off = self._offset(name)
            if off is not None:  # contiguous: a read-only view of the mapped file
                return np.frombuffer(self._mm, dtype=dt, count=info.numel, offset=off).reshape(info.shape)
            self._check_stored(name, ds, info)
            if ds.chunks is not None and info.nbytes >= SPILL_MIN:
                return self._read_spilled(ds, kind, info)
            out = np.empty(info.shape, dtype=dt)
            if out.size:
                # opaque and enum data are read as stored; everything else is
                # converted by HDF5 into the native-order buffer
                ds.read_direct(out.view(ds.dtype) if kind in ("opaque", "enum") else out)
            return out
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise EmaError(f"cannot read: {_msg(e)}", path=self.path, tensor=name) from None

    def _read_spilled(self, ds, kind: str, info: TensorInfo) -> np.ndarray:
        """A large chunked (compressed) dataset, decoded slab by slab into an
        unlinked temporary file that is mapped: the tensor's pages are file
        pages (written back and reclaimed by the kernel), not anonymous memory,
        and the file's space is freed with the array.  Costs
        disk space in the temporary directory ($TMPDIR) for each such tensor
        being averaged."""
        import tempfile

        dt = dtypes.to_numpy(info.dtype)
        try:
            with tempfile.TemporaryFile(prefix="ema-avg-h5-") as tmp:
                # reserved, not sparse: a full disk fails here, not as SIGBUS on a mapped write
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(tmp.fileno(), 0, info.nbytes)
                else:
                    os.ftruncate(tmp.fileno(), info.nbytes)
                mm = mmap.mmap(tmp.fileno(), info.nbytes, access=mmap.ACCESS_WRITE)
        except OSError as e:
            raise EmaError(f"cannot stage a {info.nbytes}-byte chunked dataset in the temporary "
                           f"directory: {e.strerror} (set TMPDIR)", path=self.path, tensor=info.name) from None
        out = np.frombuffer(mm, dtype=dt, count=info.numel).reshape(info.shape)
        dest = out.view(ds.dtype) if kind in ("opaque", "enum") else out
        for sel in _read_slabs(ds, info.shape):
            ds.read_direct(dest, source_sel=sel, dest_sel=sel)
        if hasattr(mmap, "MADV_DONTNEED"):
            try:  # written: let the kernel write the pages back and take them from this process
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass
        out.flags.writeable = False
        return out

    def _check_stored(self, name: str, ds, info: TensorInfo) -> None:
        """Refuse a dataset that declares far more data than the file stores.

        Data that is not mapped in place is decoded whole, into memory or a
        temporary file (``_read_spilled``).  A chunked dataset whose chunks were
        never written (they read as the fill value) or that compresses a long
        run of one value can declare gigabytes in a file of a few kilobytes:
        reading it would take the declared size for data the file does not hold.  Over SPARSE_MIN_BYTES, a
        dataset must store at least 1/SPARSE_RATIO of its declared bytes
        (weights compress by a few percent, not by 16x)."""
        declared = info.numel * ds.dtype.itemsize
        if declared <= SPARSE_MIN_BYTES:
            return
        stored = int(ds.id.get_storage_size())
        if declared > SPARSE_RATIO * stored:
            how = "unwritten chunks or compression" if ds.chunks is not None else "unallocated storage"
            raise EmaError(f"dataset declares {declared} bytes but stores {stored} (a sparse or corrupt file: "
                           f"{how}; more than {SPARSE_RATIO}x is refused, as reading it would take "
                           f"{declared} bytes of memory or temporary disk)", path=self.path, tensor=name)

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """Done with this tensor (or its elements ``[first, last)``): a tensor
        mapped in place has its pages dropped from this process
        (``MADV_DONTNEED``; they stay in the page cache), so that the resident
        set stays small while large tensors stream.  Ranges under 512 KiB and
        tensors that are not mapped are left alone."""
        off = self._offsets.get(name)
        if off is None or self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self._tensors[name]
        item = dtypes.itemsize(info.dtype)
        end = off + (info.numel if last is None else min(last, info.numel)) * item
        begin = off + first * item
        start = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
        stop = end // mmap.PAGESIZE * mmap.PAGESIZE
        if stop - start >= 1 << 19:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
            except (OSError, ValueError):
                pass  # a hint

    def _offset(self, name: str) -> int | None:
        if name in self._offsets:
            return self._offsets[name]
        with self._map_lock:  # readers are shared by threads
            ds, kind = self._ds[name]
            off = direct_offset(ds, self._tensors[name].dtype, kind) if self._image.base is not None else None
            if off is not None and off + self._tensors[name].nbytes > self._size:
                off = None  # truncated: let HDF5 report it
            if off is not None:
                off += self._image.base  # where the image sits in its file (a .keras zip member)
                if off + self._tensors[name].nbytes > os.path.getsize(self._image.file):
                    off = None
            if off is not None and self._mm is None:
                with open(self._image.file, "rb") as fh:
                    self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._offsets[name] = off
        return self._offsets[name]

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def step(self) -> int | None:
        """The optimizer's iteration counter: Keras 3 ``optimizer/**/vars/0``
        (an integer scalar), legacy Keras ``optimizer_weights/<opt>/iteration``
        (``iterations``, tf.keras' ``iter:0``).  With several, the deepest,
        then the largest: a LossScaleOptimizer's own counter stays 0 while
        ``optimizer/inner_optimizer/vars/0`` counts.  Else a root
        ``global_step``/``step``/``iteration(s)`` integer scalar."""
        found: list[tuple[int, int]] = []
        for name, info in self._tensors.items():
            if info.numel != 1 or info.dtype not in _INT_TYPES:
                continue
            parts = name.split("/")
            if parts[0] == "optimizer" and len(parts) >= 3 and parts[-2:] == ["vars", "0"]:
                found.append((len(parts), self._scalar(name)))
            elif parts[0] == "optimizer_weights" and parts[-1].split(":")[0] in LEGACY_COUNTERS:
                found.append((len(parts), self._scalar(name)))
        if found:
            return max(found)[1]
        for n in ROOT_COUNTERS:
            info = self._tensors.get(n)
            if info is not None and info.numel == 1 and info.dtype in _INT_TYPES:
                return self._scalar(n)
        return None

    def _scalar(self, name: str) -> int:
        return int(self.read(name).reshape(-1)[0])

    # ------------------------------------------------------------- roles

    def role(self, info: TensorInfo) -> Role:
        """From the layout Keras writes.  Keras 3 ``.weights.h5``: each layer's
        variables are ``<path>/vars/<i>``, in the layer's order (trainable, then
        non-trainable); the group is named after the layer's class
        (``batch_normalization``, ``batch_normalization_1``: Keras names it so
        that a renamed layer still loads) and ``vars`` carries the layer's own
        name as attribute ``name``, which the model config (``config.json`` of a
        ``.keras``, ``model_config`` of a legacy ``.h5``) maps to its class and
        options.  Legacy ``.h5``: ``model_weights/<layer>/.../<weight>`` with the
        weight's own name.  ``optimizer/``, ``optimizer_weights/``: optimizer
        state, its iteration counter a counter."""
        name, parts = info.name, info.name.split("/")
        if parts[0] in OPTIMIZER_GROUPS:
            keras = self.legacy_keras or "layers" in self._f or "vars" in self._f
            if self._is_iteration_counter(info):
                return Role(COUNTER, "keras optimizer: iteration counter" if keras else f"optimizer counter ({parts[0]}/)")
            return Role(OPTIMIZER, "keras optimizer variable" if keras else f"optimizer state ({parts[0]}/)")
        if not dtypes.is_float(info.dtype):
            if name in ROOT_COUNTERS and info.numel == 1 and info.dtype in _INT_TYPES:
                return Role(COUNTER, f"step counter ({name})")
            return Role(OTHER, f"{info.dtype}: not floating point")
        if len(parts) >= 2 and parts[-2] == "vars" and parts[-1].isdigit() and not self.legacy_keras:
            return self._keras3_role(info, parts)
        if self.legacy_keras and parts[0] == "model_weights" and len(parts) >= 3:
            return self._legacy_role(parts)
        return super().role(info)

    def _is_iteration_counter(self, info: TensorInfo) -> bool:
        parts = info.name.split("/")
        if info.numel != 1 or info.dtype not in _INT_TYPES:
            return False
        if parts[0] == "optimizer":
            return parts[-2:] == ["vars", "0"]
        return parts[-1].split(":")[0] in LEGACY_COUNTERS

    def set_model_config(self, config) -> None:
        """The model's config (a ``.keras``'s ``config.json``): layer classes by name."""
        self._layer_classes = _layer_classes(config)

    def _classes(self) -> dict[str, tuple[str, dict]]:
        if self._layer_classes is None:
            self._layer_classes = {}
            if self.legacy_keras and "model_config" in self._f.attrs:
                try:
                    text = _attr_str(_attr_value(self._f, "model_config", self.check_heaps))
                    self._layer_classes = _layer_classes(json.loads(text)) if text else {}
                except (ValueError, TypeError, OSError, RuntimeError):
                    self._layer_classes = {}  # no usable config: the layout alone decides
        return self._layer_classes

    def _keras3_role(self, info: TensorInfo, parts: list[str]) -> Role:
        group = "/".join(parts[:-1])  # .../vars
        index = int(parts[-1])
        layer_group = parts[-3] if len(parts) >= 3 else ""  # the class-derived group name
        cls, cfg, how = None, None, ""
        layer_name = self._vars_name(group)
        if layer_name is not None and layer_name in self._classes():
            cls, cfg = self._classes()[layer_name]
            how = ""
        elif _KERAS_BN_GROUP.match(layer_group):
            cls, how = "BatchNormalization", " (class from its group name)"
        if cls == "BatchNormalization":
            names = self._bn_var_names(group, cfg)
            if names is not None and index < len(names):
                what = names[index]
                kind = BUFFER if what in _BN_BUFFERS else PARAMETER
                return Role(kind, f"keras layer BatchNormalization{how}: {what}")
        label = cls or (layer_group or "model")
        return Role(PARAMETER, f"keras layer {label}: vars/{index}")

    def _vars_name(self, group: str) -> str | None:
        """The layer's own name, stored on its ``vars`` group by Keras 3."""
        try:
            g = self._f[group]
            if "name" not in g.attrs:
                return None
            return _attr_str(_attr_value(g, "name", self.check_heaps))
        except (KeyError, OSError, ValueError, TypeError, RuntimeError):
            return None

    def _bn_var_names(self, group: str, cfg: dict | None) -> list[str] | None:
        """A BatchNormalization layer's variables in the order it saves them:
        gamma (scale), beta (center), moving_mean, moving_variance, then the
        renorm statistics.  From its config when known, else from how many
        equally shaped variables there are (2-4 without renorm, 5-7 with: the
        counts do not overlap); None when the group does not look like one."""
        prefix = group + "/"
        shapes = {int(n[len(prefix):]): i.shape for n, i in self._tensors.items()
                  if n.startswith(prefix) and n[len(prefix):].isdigit()}
        n = len(shapes)
        if sorted(shapes) != list(range(n)) or len(set(shapes.values())) != 1:
            return None
        if cfg is not None:
            names = (["gamma"] if cfg.get("scale", True) else []) + (["beta"] if cfg.get("center", True) else [])
            names += ["moving_mean", "moving_variance"]
            if cfg.get("renorm"):
                names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
            if len(names) == n:
                return names
        stats = 2 if 2 <= n <= 4 else 5 if 5 <= n <= 7 else 0
        if not stats:
            return None
        params = {0: [], 1: ["gamma or beta"], 2: ["gamma", "beta"]}[n - stats]
        return params + ["moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"][:stats]

    def _legacy_role(self, parts: list[str]) -> Role:
        layer = parts[1]
        weight = parts[-1].split(":")[0]
        cls = self._classes().get(layer, (None, None))[0]
        if cls == "BatchNormalization":
            kind = BUFFER if weight in _BN_BUFFERS else PARAMETER
            return Role(kind, f"keras layer BatchNormalization: {weight}")
        if cls is None and weight in _BN_BUFFERS:
            return Role(BUFFER, f"name rules: statistics buffer ({weight})")
        return Role(PARAMETER, f"keras layer {cls or layer}: {weight}")

    def extras(self):
        layout = "hdf5"
        if self.legacy_keras:
            layout = "keras-legacy-h5"
        elif "layers" in self._f or "vars" in self._f:
            layout = "keras3-weights-h5"
        return {"layout": layout, "not_tensors": dict(self.not_tensors)}

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - closing twice or after a failed open
            pass
        self._close_fileobj()
        if getattr(self, "_mm", None) is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views still alive; the map is released with them


_INT_TYPES = frozenset({"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8"})
_BN_BUFFERS = frozenset({"moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"})
_KERAS_BN_GROUP = re.compile(r"^batch_normalization(_\d+)?$")  # keras naming.to_snake_case + unique suffix


def _layer_classes(config) -> dict[str, tuple[str, dict]]:
    """Every layer in a Keras model config, by name: (class name, its config).
    A name given to layers of different classes (nested models) is left out."""
    out: dict[str, tuple[str, dict]] = {}
    clash: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            cfg = node.get("config")
            if isinstance(node.get("class_name"), str) and isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
                nm, cls = cfg["name"], node["class_name"]
                if nm in out and out[nm][0] != cls:
                    clash.add(nm)
                out.setdefault(nm, (cls, cfg))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return {k: v for k, v in out.items() if k not in clash}


def _read_slabs(ds, shape: tuple[int, ...]):
    """Selections that read a chunked dataset with each chunk decoded once:
    slabs of whole chunk rows (``chunks[0]`` rows of the first dimension, up to
    ROW_BUFFER bytes together), or chunk by chunk when one row of chunks is larger."""
    c0 = int(ds.chunks[0])
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    per = max(1, ROW_BUFFER // max(1, c0 * row_bytes)) * c0
    if c0 * row_bytes > ROW_BUFFER:
        yield from ds.iter_chunks()
        return
    for r in range(0, shape[0], per):
        yield np.s_[r:min(r + per, shape[0])]


def _read_strings(ds, kind: str) -> np.ndarray:
    raw = ds[()]
    arr = np.empty(ds.shape, dtype=object)
    if kind == "vlen-bytes":
        flat = np.asarray(raw, dtype=object).reshape(-1) if ds.shape else [raw]
        arr.reshape(-1)[:] = [np.asarray(x, dtype=np.uint8).tobytes() for x in flat] if arr.size else []
        return arr
    src = np.asarray(raw, dtype=object)
    flat = [x.encode() if isinstance(x, str) else bytes(x) for x in src.reshape(-1)]
    if arr.size:
        arr.reshape(-1)[:] = flat
    return arr


Reader = Hdf5Reader


# --------------------------------------------------------------------------- writing

def _check_names(names: list[str], path: str) -> None:
    """Every name must map to its own HDF5 path: no empty or '.' components,
    and no tensor may sit where another needs a group."""
    taken = set(names)
    for n in names:
        parts = n.split("/")
        if any(p in ("", ".") for p in parts):
            raise EmaError("name has an empty or '.' path component: it cannot be an HDF5 dataset path",
                           path=path, tensor=n)
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in taken:
                raise EmaError(f"tensor {prefix!r} would have to be an HDF5 group to hold this one "
                               "(HDF5 cannot store both; write safetensors or TF instead)", path=path, tensor=n)


def _copy_attrs(src, dst, *, skip=()) -> None:
    """Copy every attribute with its own HDF5 type and shape."""
    h5py = _h5py()
    for key in src.attrs:
        if key in skip:
            continue
        aid = src.attrs.get_id(key)
        bname = key.encode() if isinstance(key, str) else key
        space = aid.get_space()
        new = h5py.h5a.create(dst.id, bname, aid.get_type(), space)
        if space.get_simple_extent_type() != h5py.h5s.NULL:
            buf = np.empty(aid.shape, dtype=aid.dtype)
            aid.read(buf)
            new.write(buf)


class Hdf5Writer(Writer):
    """HDF5 output: from an HDF5 template (copy and overwrite in place, or
    rebuild when dtypes change) or from scratch (any other template)."""

    writes_ranges = True

    def __init__(self, path: str, shards: list[list[TensorInfo]], metadata: dict[str, str], template=None,
                 *, shown: str | None = None):
        if len(shards) > 1:
            raise UsageError("HDF5 output is a single file: --max-shard-size applies to safetensors output")
        self.path = path
        self.shown = shown or shown_path(path)  # the output path the user named, for messages
        self._infos = {i.name: i for i in (shards[0] if shards else [])}
        self._pending = set(self._infos)
        self._lock = threading.Lock()
        self._metadata = {k: v for k, v in metadata.items() if isinstance(v, str)}
        self._f = None
        self._fd = -1  # raw descriptor for contiguous datasets written in place
        self._direct: dict[str, int] = {}  # name -> file offset of its bytes
        self._changed: set[str] = set()  # datasets recreated with a new dtype
        self._slabs: dict[str, list] = {}  # write_range: name -> [buffer, first element, elements filled]
        self._slab_sizes: dict[str, int] = {}
        # an HDF5 image of its own (a file, or the model.weights.h5 of a .keras) is the layout kept
        self._template = template if isinstance(template, Hdf5Reader) else None
        try:
            if self._template is not None:
                self._start_from_template(self._template)
            else:
                _check_names(list(self._infos), self.shown)
                self._f = _open(path, "w")
                self._fd = os.open(path, os.O_RDWR)
                for info in self._infos.values():
                    if info.dtype != "string":  # strings: created when their value is known
                        self._create(self._f, info.name, info.dtype)
        except EmaError:
            self.abort()
            raise
        except (OSError, ValueError, TypeError, RuntimeError, KeyError) as e:
            self.abort()
            raise EmaError(f"cannot write: {_msg(e)}", path=self.shown) from None

    # ------------------------------------------------------------- template

    def _start_from_template(self, tmpl: Hdf5Reader) -> None:
        tmpl.check_heaps()  # its objects and attributes are copied, variable-length ones too
        have = tmpl.tensors()
        foreign = [n for n in self._infos if n not in have]
        if foreign:
            raise EmaError(
                f"{len(foreign)} output tensor(s) are not datasets of {tmpl.path}, whose layout HDF5 output "
                f"keeps: {', '.join(foreign[:3])}" + (" ..." if len(foreign) > 3 else "")
                + " (--names shadow needs safetensors or TF output)", path=self.shown)
        self._changed = {n for n, i in self._infos.items() if i.dtype != have[n].dtype}
        if not self._changed:
            tmpl.copy_image(self.path)
            # a byte copy: contiguous datasets sit at the template's offsets
            for name in self._infos:
                ds, kind = tmpl._ds[name]
                off = direct_offset(ds, have[name].dtype, kind)
                if off is not None:
                    self._direct[name] = off
            self._fd = os.open(self.path, os.O_RDWR)
            self._f = _open(self.path, "r+")
        else:
            self._rebuild(tmpl)

    def _rebuild(self, tmpl: Hdf5Reader) -> None:
        """A new file with the template's objects, except the datasets whose
        dtype changes, which are created anew with the same attributes and
        creation properties (chunks, filters, fill value).  Groups are walked
        in link order; an object linked twice is linked twice again."""
        h5py = _h5py()
        src = tmpl._f
        root = src["/"]
        fcpl = src.id.get_create_plist()
        gcpl = root.id.get_create_plist()  # the root group's order tracking lives here
        if gcpl.get_link_creation_order():
            fcpl.set_link_creation_order(gcpl.get_link_creation_order())
        if gcpl.get_attr_creation_order():
            fcpl.set_attr_creation_order(gcpl.get_attr_creation_order())
        fid = h5py.h5f.create(self.path.encode(), h5py.h5f.ACC_TRUNC, fcpl=fcpl)
        self._f = h5py.File(fid)
        ub = src.userblock_size
        _copy_attrs(root, self._f)
        first_path = {root.id: "/"}  # source object -> its path in the new file

        def copy(sgroup, dgroup, prefix: str) -> None:
            for key in sgroup:
                name, bkey = prefix + key, key.encode()
                dpath = f"{dgroup.name.rstrip('/')}/{key}"
                obj = sgroup[key]  # hard links only: the reader refused every other kind
                if obj.id in first_path:
                    dgroup[key] = self._f[first_path[obj.id]]
                    continue
                first_path[obj.id] = dpath
                if isinstance(obj, h5py.Group):
                    sub = h5py.Group(h5py.h5g.create(dgroup.id, bkey, gcpl=obj.id.get_create_plist()))
                    _copy_attrs(obj, sub)
                    copy(obj, sub, name + "/")
                elif name in self._changed:
                    self._recreate(tmpl, obj, dgroup, key, name)
                else:  # data, attributes and creation properties as they are
                    h5py.h5o.copy(sgroup.id, bkey, dgroup.id, bkey)

        copy(root, self._f, "")
        if ub:
            self._f.close()
            block = tmpl.image_head(ub)
            with open(self.path, "r+b") as fh:
                fh.write(block)
            self._f = _open(self.path, "r+")

    def _recreate(self, tmpl: Hdf5Reader, old, dgroup, key: str, name: str) -> None:
        h5py = _h5py()
        dtype, old_dtype = self._infos[name].dtype, tmpl.tensors()[name].dtype
        dcpl = old.id.get_create_plist()
        sdt = _storage_dtype(dtype)
        if dcpl.fill_value_defined() == h5py.h5d.FILL_VALUE_USER_DEFINED:
            fill = np.zeros((), dtype=old.dtype)
            dcpl.get_fill_value(fill)
            fill = fill.view(dtypes.to_numpy(old_dtype)) if fill.dtype.kind == "V" else fill
            dcpl.set_fill_value(dtypes.cast_rounded(fill, dtype).view(sdt))
        if old.shape:
            maxshape = tuple(h5py.h5s.UNLIMITED if m is None else m for m in old.maxshape)
            space = h5py.h5s.create_simple(old.shape, maxshape)
        else:
            space = h5py.h5s.create(h5py.h5s.SCALAR)
        try:
            dsid = h5py.h5d.create(dgroup.id, key.encode(), h5py.h5t.py_create(sdt), space, dcpl=dcpl)
        except (OSError, ValueError, RuntimeError) as e:
            raise EmaError(f"cannot recreate the dataset as {dtype} with its creation properties "
                           f"(use --dtype keep): {_msg(e)}", path=self.shown, tensor=name) from None
        new = h5py.Dataset(dsid)
        old_tag = _attr_str(old.attrs[DTYPE_ATTR]) if DTYPE_ATTR in old.attrs else None
        drop_tag = _needs_tag(dtype) or (old_tag is not None and dtypes.known(old_tag))
        _copy_attrs(old, new, skip=(DTYPE_ATTR,) if drop_tag else ())
        if _needs_tag(dtype):
            new.attrs[DTYPE_ATTR] = dtype

    # ------------------------------------------------------------- scratch

    def _create(self, f, name: str, dtype: str):
        """A contiguous dataset, its space allocated now (without fill) so
        that its values can be written in place."""
        h5py = _h5py()
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every value is written
        parent, _, base = name.rpartition("/")
        group = f.require_group(parent) if parent else f
        shape = self._infos[name].shape
        space = h5py.h5s.create_simple(shape) if shape else h5py.h5s.create(h5py.h5s.SCALAR)
        tid = h5py.h5t.py_create(_storage_dtype(dtype), logical=True)
        ds = h5py.Dataset(h5py.h5d.create(group.id, base.encode(), tid, space, dcpl=dcpl))
        if _needs_tag(dtype):
            ds.attrs[DTYPE_ATTR] = dtype
        off = direct_offset(ds, dtype, "opaque" if _needs_tag(dtype) else "plain")
        if off is not None:
            self._direct[name] = off
        return ds

    def _create_strings(self, name: str, arr: np.ndarray):
        h5py = _h5py()
        vals = [x.encode() if isinstance(x, str) else bytes(x) for x in arr.reshape(-1)]
        if all(b"\x00" not in v for v in vals):
            data = np.empty(arr.shape, dtype=object)
            if data.size:
                data.reshape(-1)[:] = vals
            self._f.create_dataset(name, data=data, dtype=h5py.string_dtype("utf-8" if _utf8(vals) else "ascii"))
        else:  # binary bytes: HDF5 strings stop at NUL, so store bytes sequences
            data = np.empty(arr.shape, dtype=object)
            data.reshape(-1)[:] = [np.frombuffer(v, dtype=np.uint8) for v in vals]
            ds = self._f.create_dataset(name, data=data, dtype=h5py.vlen_dtype(np.uint8))
            ds.attrs[DTYPE_ATTR] = "string"

    # ------------------------------------------------------------- streaming

    def write(self, name: str, array: np.ndarray) -> None:
        info = self._infos[name]
        arr = np.asarray(array)
        if arr.shape != info.shape:
            raise EmaError(f"internal: shape {arr.shape} != {info.shape}", tensor=name)
        off = self._direct.get(name)
        try:
            if off is not None:  # straight to the dataset's bytes: no h5py, no lock
                buf = np.asarray(arr, dtype=dtypes.to_numpy(info.dtype), order="C")
                _pwrite_all(self._fd, memoryview(buf.reshape(-1).view(np.uint8)), off)
                with self._lock:
                    self._pending.discard(name)
                return
            with self._lock:
                self._write(name, info, arr)
                self._pending.discard(name)
        except EmaError:
            raise
        except (OSError, ValueError, TypeError, RuntimeError, KeyError) as e:
            raise EmaError(f"cannot write: {_msg(e)}", path=self.shown, tensor=name) from None

    def write_range(self, name: str, start: int, flat: np.ndarray) -> None:
        """Elements ``[start, start + flat.size)`` of a tensor in C order (``flat``:
        1-D, contiguous, the tensor's dtype), so that the engine streams large
        tensors instead of handing them whole: memory does not grow with the
        tensor.  The range that ends at the tensor's last element completes it.

        A dataset whose bytes sit in the file as they are (contiguous, allocated,
        native order: every dataset of a fresh file, most template datasets) is
        written in place with pwrite.  Any other is written through HDF5, the
        flat range cut into the few rectangular selections it spans; a chunked
        dataset first gathers whole slabs of chunk rows (``chunks[0]`` rows of
        its first dimension, up to ROW_BUFFER bytes), so that each chunk is
        compressed and written once instead of once per range."""
        info = self._infos[name]
        dt = dtypes.to_numpy(info.dtype)
        n = info.numel
        if flat.dtype != dt or flat.ndim != 1 or not flat.flags.c_contiguous or not 0 <= start <= n - flat.size:
            raise EmaError(f"internal: bad range {start}+{flat.size} ({flat.dtype}) of {n} {dt}", tensor=name)
        off = self._direct.get(name)
        try:
            if off is not None:
                _pwrite_all(self._fd, memoryview(flat.view(np.uint8)), off + start * dt.itemsize)
            else:
                with self._lock:
                    self._write_range(name, info, start, flat)
            if start + flat.size == n:
                with self._lock:
                    self._flush_slab(name)
                    self._pending.discard(name)
        except EmaError:
            raise
        except (OSError, ValueError, TypeError, RuntimeError, KeyError) as e:
            raise EmaError(f"cannot write: {_msg(e)}", path=self.shown, tensor=name) from None

    def _write_range(self, name: str, info: TensorInfo, start: int, flat: np.ndarray) -> None:
        ds = self._f[name]
        slab = self._slab_size(name, ds, info)
        pos, data = start, flat
        while data.size:
            st = self._slabs.get(name)
            if st is not None and pos == st[1] + st[2]:  # continues the slab being gathered
                buf, base, filled = st
                k = min(data.size, buf.size - filled)
                buf[filled:filled + k] = data[:k]
                st[2] = filled + k
                pos, data = pos + k, data[k:]
                if st[2] == buf.size or base + st[2] == info.numel:
                    self._flush_slab(name)
                continue
            if st is not None:
                self._flush_slab(name)  # out of order: write what was gathered
            if slab and pos % slab == 0:
                self._slabs[name] = [np.empty(min(slab, info.numel - pos), dtype=data.dtype), pos, 0]
                continue
            k = data.size if not slab else min(data.size, slab - pos % slab)
            self._put(ds, info.shape, pos, data[:k])
            pos, data = pos + k, data[k:]

    def _slab_size(self, name: str, ds, info: TensorInfo) -> int:
        """Elements per gathered slab of a chunked dataset (0: written as it comes)."""
        if name not in self._slab_sizes:
            size = 0
            if ds.chunks is not None and len(info.shape) >= 1:
                size = int(ds.chunks[0]) * (info.numel // max(1, info.shape[0]))
                if size * ds.dtype.itemsize > ROW_BUFFER:
                    size = 0  # too large to gather: HDF5's chunk cache merges the parts
            self._slab_sizes[name] = size
        return self._slab_sizes[name]

    def _flush_slab(self, name: str) -> None:
        st = self._slabs.pop(name, None)
        if st is not None and st[2]:
            buf, base, filled = st
            self._put(self._f[name], self._infos[name].shape, base, buf[:filled])

    def _put(self, ds, shape: tuple[int, ...], start: int, flat: np.ndarray) -> None:
        """Write flat elements ``[start, start + flat.size)`` through HDF5."""
        if ds.dtype.kind == "V" or _h5py().check_enum_dtype(ds.dtype) is not None:
            flat = flat.view(ds.dtype)  # opaque (bf16, f8) and enum data are written as stored
        pos = 0
        for box in _boxes(shape, start, start + flat.size):
            bshape = tuple(b.stop - b.start for b in box)
            m = int(np.prod(bshape, dtype=np.int64))
            part = np.ascontiguousarray(flat[pos:pos + m]).reshape(bshape)
            ds.write_direct(part, dest_sel=box if box else np.s_[()])
            pos += m

    def _write(self, name: str, info: TensorInfo, arr: np.ndarray) -> None:
        if info.dtype == "string":
            if self._template is None:
                self._create_strings(name, arr)
            elif not _same_strings(self._template.read(name), arr):
                raise EmaError("internal: a string tensor differs from the template's", tensor=name)
            return  # the template's copy already holds the newest value
        ds = self._f[name]
        buf = np.asarray(arr, dtype=dtypes.to_numpy(info.dtype), order="C")
        if self._template is not None and name not in self._changed:
            # a chunked or converted dataset that already holds these values
            # (a copied tensor): leave its stored (compressed) bytes alone
            old = self._template.read(name)
            if old.dtype == buf.dtype and old.shape == buf.shape and _same_bytes(old, buf):
                return
        if ds.dtype.kind == "V" or _h5py().check_enum_dtype(ds.dtype) is not None:
            buf = buf.view(ds.dtype)  # opaque (bf16, f8) and enum data are written as stored
        if buf.size:
            ds.write_direct(buf)

    def close(self) -> None:
        if self._pending:
            raise EmaError(f"internal: {len(self._pending)} tensors never written", path=self.shown)
        try:
            with self._lock:
                for k, v in self._metadata.items():
                    if self._template is None or k == "ema_avg":
                        self._f.attrs[k] = v
                self._f.close()
                self._f = None
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except (OSError, ValueError, RuntimeError) as e:
            raise EmaError(f"cannot write: {_msg(e)}", path=self.shown) from None

    def abort(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - best effort after a failure
                pass
            self._f = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _boxes(shape: tuple[int, ...], a: int, b: int) -> list[tuple[slice, ...]]:
    """Flat C-order elements ``[a, b)`` of an array of ``shape`` as rectangular
    selections, in order (at most 2 * ndim - 1 of them): a partial first row,
    whole rows, a partial last row, each partial row split the same way."""
    if a >= b:
        return []
    if not shape:
        return [()]
    if len(shape) == 1:
        return [(slice(a, b),)]
    row = int(np.prod(shape[1:], dtype=np.int64))
    r0, o0 = divmod(a, row)
    r1, o1 = divmod(b, row)
    if r0 == r1:
        return [(slice(r0, r0 + 1), *box) for box in _boxes(shape[1:], o0, o1)]
    out: list[tuple[slice, ...]] = []
    if o0:
        out += [(slice(r0, r0 + 1), *box) for box in _boxes(shape[1:], o0, row)]
        r0 += 1
    if r1 > r0:
        out.append((slice(r0, r1), *(slice(0, d) for d in shape[1:])))
    if o1:
        out += [(slice(r1, r1 + 1), *box) for box in _boxes(shape[1:], 0, o1)]
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data[: 1 << 30], offset)
        data, offset = data[n:], offset + n


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte equality of two C-contiguous arrays, 1 MiB at a time (no whole copies)."""
    x = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    y = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    step = 1 << 20
    return x.size == y.size and all(x[i:i + step].tobytes() == y[i:i + step].tobytes() for i in range(0, x.size, step))


def _utf8(vals: list[bytes]) -> bool:
    try:
        for v in vals:
            v.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _same_strings(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    return a.shape == b.shape and all(
        (x.encode() if isinstance(x, str) else bytes(x)) == (y.encode() if isinstance(y, str) else bytes(y))
        for x, y in zip(a.reshape(-1), b.reshape(-1))
    )


Writer = Hdf5Writer


class Hdf5Format(Format):
    name = NAME
    reader = Hdf5Reader
    writer = Hdf5Writer

    claim_path = staticmethod(claim_path)
    scan_dir = staticmethod(scan_dir)
    is_output = staticmethod(is_output)
    make_staging = staticmethod(make_staging)

    def directory_name(self, shards, newest):
        if shards > 1:
            raise UsageError("HDF5 output is a single file: --max-shard-size applies to safetensors output")
        return "model.weights.h5" if newest.format == NAME and newest.path.endswith(".weights.h5") else "model.h5"


FORMAT = Hdf5Format()
