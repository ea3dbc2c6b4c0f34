"""TensorFlow tensor bundles (the V2 checkpoint format), read and written without TensorFlow.

A bundle is a prefix with an ``.index`` and ``.data-NNNNN-of-MMMMM`` files
(TensorFlow's ``tensorflow/core/util/tensor_bundle/``):

* the ``.index`` is a LevelDB-format table (``table/format.cc``,
  ``block_builder.cc``): data blocks of prefix-compressed ``(key, value)``
  entries with restart points, each followed by a 5-byte trailer (compression
  type, masked CRC32C of the block and that byte), a metaindex block, an index
  block whose entries point at the data blocks, and a 48-byte footer ending in
  the table magic number.  Key ``""`` holds a ``BundleHeaderProto``
  (num_shards, endianness, version); every other key is a tensor name (or a
  partitioned variable's slice key) holding a ``BundleEntryProto`` (dtype,
  shape, shard_id, offset, size, masked crc32c of the bytes, slices).  Keys are
  in bytewise order.
* the data files hold each tensor's bytes, little-endian, at its entry's
  offset.  A string tensor is a varint64 length per element, a masked CRC32C of
  the lengths (as little-endian uint32), then the bytes; its entry's crc32c
  covers all three.

The protobuf messages are decoded from the wire format by hand (a handful of
fields, see :func:`decode_entry`); numeric tensors come back as zero-copy
numpy views of the memory-mapped data file.

CRC32C: the ``crc32c`` package (ICRAR's maintained C extension: SSE4.2/ARMv8
CRC instructions, a C table fallback elsewhere).  A pure-Python CRC32C runs
at ~30 MB/s, hundreds of times slower, which would make checking a multi-GB
checkpoint take minutes.  Not ``google-crc32c``, the other maintained binding:
its ``extend`` takes only ``bytes`` (every mapped chunk copied first) and holds
the GIL, so two threads checksumming two tensors run one after the other.
Measured on 256 MiB of mapped data: 0.040 s with ``google-crc32c`` (copies
included), 0.021 s with ``crc32c`` on the mapped buffer itself; two threads
at once 0.073 s against 0.024 s.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass, field

import numpy as np

from ema_cli import dtypes
from ema_cli.errors import EmaError
from ema_cli.storage import FlatStream

CRC_HINT = "needs the crc32c package: pip install crc32c (a dependency of ema-avg)"
SNAPPY_HINT = "pip install cramjam (a dependency of ema-avg)"
TABLE_MAGIC = 0xDB4775248B80FB57
HEADER_KEY = b""
BUNDLE_VERSION = 1  # kTensorBundleVersion
_MASK_DELTA = 0xA282EAD8
_CHUNK = 1 << 20  # bytes per CRC32C call over mapped data (crc32c releases the GIL for each)

#: DataType enum -> canonical dtype name (types.proto); others are refused
DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
               8: "complex64", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128",
               19: "float16", 22: "uint32", 23: "uint64", 24: "float8_e5m2", 25: "float8_e4m3fn",
               26: "float8_e4m3fnuz", 28: "float8_e5m2fnuz"}
DTYPE_ENUMS = {v: k for k, v in DTYPE_NAMES.items()}
#: what the others are called, for messages
OTHER_DTYPES = {0: "invalid", 11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16",
                20: "resource", 21: "variant", 27: "float8_e4m3b11fnuz", 29: "int4", 30: "uint4", 31: "int2",
                32: "uint2", 33: "float4_e2m1fn"}


def dtype_text(enum: int) -> str:
    return DTYPE_NAMES.get(enum) or OTHER_DTYPES.get(enum) or f"DataType {enum}"


# --------------------------------------------------------------------------- CRC32C

_ext = None


def _crc_lib():
    """``extend(crc, data) -> crc``: CRC32C of any contiguous buffer, continuing ``crc``."""
    global _ext
    if _ext is None:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # its own "software mode" warning: ours below
                import crc32c as lib
        except ImportError:
            raise EmaError(CRC_HINT) from None
        if not getattr(lib, "hardware_based", True):
            from ema_cli.notices import warn

            warn("crc32c has no CPU instructions for CRC32C on this machine: checking TensorFlow checkpoints' "
                 "checksums runs at table speed (about 1 GB/s)")
        fn = lib.crc32c

        def extend(crc: int, data) -> int:
            return fn(data, crc)

        _ext = extend
    return _ext


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of ``data`` (any contiguous buffer) continuing ``crc``."""
    ext = _crc_lib()
    if isinstance(data, bytes):
        return ext(crc, data)
    mv = memoryview(data).cast("B")
    for i in range(0, len(mv), _CHUNK):
        crc = ext(crc, mv[i:i + _CHUNK])
    return crc


def mask(crc: int) -> int:
    """LevelDB's masked CRC (a CRC stored next to data it covers)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data) -> int:
    return mask(crc32c(data))


# --------------------------------------------------------------------------- protobuf wire format


class WireError(ValueError):
    """Bytes that are not the expected protobuf message."""


def read_varint(buf, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf):
            raise WireError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7
        if shift >= 70:
            raise WireError("varint too long")


def varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def fields(buf):
    """``(field number, wire type, value)`` of a message: ints for varint and
    fixed fields, bytes for length-delimited ones."""
    buf = bytes(buf)
    i, n = 0, len(buf)
    while i < n:
        tag, i = read_varint(buf, i)
        num, wt = tag >> 3, tag & 7
        if num == 0:
            raise WireError("field number 0")
        if wt == 0:
            v, i = read_varint(buf, i)
        elif wt == 1:
            if i + 8 > n:
                raise WireError("truncated fixed64")
            (v,) = struct.unpack_from("<Q", buf, i)
            i += 8
        elif wt == 5:
            if i + 4 > n:
                raise WireError("truncated fixed32")
            (v,) = struct.unpack_from("<I", buf, i)
            i += 4
        elif wt == 2:
            ln, i = read_varint(buf, i)
            if i + ln > n:
                raise WireError("truncated length-delimited field")
            v = buf[i:i + ln]
            i += ln
        else:
            raise WireError(f"wire type {wt}")
        yield num, wt, v


def signed64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _want(wt: int, expected: int, what: str) -> None:
    if wt != expected:
        raise WireError(f"{what}: wire type {wt}")


def tag(num: int, wt: int) -> bytes:
    return varint(num << 3 | wt)


def len_field(num: int, payload: bytes) -> bytes:
    return tag(num, 2) + varint(len(payload)) + payload


def varint_field(num: int, v: int) -> bytes:
    return tag(num, 0) + varint(v)


# --------------------------------------------------------------------------- bundle protos


@dataclass
class Header:
    num_shards: int = 0
    endianness: int = 0  # 0 little, 1 big
    producer: int = 0
    min_consumer: int = 0
    bad_consumers: list[int] = field(default_factory=list)


@dataclass
class Entry:
    dtype: int = 0
    shape: list[int] = field(default_factory=list)
    unknown_rank: bool = False
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    # each slice: [(start, length)], length -1 for the whole dimension
    slices: list[list[tuple[int, int]]] = field(default_factory=list)


def decode_header(buf) -> Header:
    h = Header()
    for num, wt, v in fields(buf):
        if num == 1:
            _want(wt, 0, "num_shards")
            h.num_shards = signed32(v)
        elif num == 2:
            _want(wt, 0, "endianness")
            h.endianness = signed32(v)
        elif num == 3:
            _want(wt, 2, "version")
            for n2, w2, v2 in fields(v):
                if n2 in (1, 2):
                    _want(w2, 0, "version")
                    if n2 == 1:
                        h.producer = signed32(v2)
                    else:
                        h.min_consumer = signed32(v2)
                elif n2 == 3:
                    if w2 == 2:  # packed
                        j = 0
                        while j < len(v2):
                            x, j = read_varint(v2, j)
                            h.bad_consumers.append(signed32(x))
                    else:
                        _want(w2, 0, "bad_consumers")
                        h.bad_consumers.append(signed32(v2))
    return h


def encode_header(num_shards: int) -> bytes:
    return varint_field(1, num_shards) + len_field(3, varint_field(1, BUNDLE_VERSION))


def _decode_shape(buf, e: Entry) -> None:
    for num, wt, v in fields(buf):
        if num == 2:
            _want(wt, 2, "shape.dim")
            size = 0
            for n2, w2, v2 in fields(v):
                if n2 == 1:
                    _want(w2, 0, "dim.size")
                    size = signed64(v2)
            e.shape.append(size)
        elif num == 3:
            _want(wt, 0, "unknown_rank")
            e.unknown_rank = bool(v)


def _decode_slice(buf) -> list[tuple[int, int]]:
    out = []
    for num, wt, v in fields(buf):
        if num == 1:
            _want(wt, 2, "slice.extent")
            start, length = 0, -1
            for n2, w2, v2 in fields(v):
                if n2 == 1:
                    _want(w2, 0, "extent.start")
                    start = signed64(v2)
                elif n2 == 2:
                    _want(w2, 0, "extent.length")
                    length = signed64(v2)  # absent: the whole dimension (TensorFlow's kFullExtent, -1)
            out.append((start, length))
    return out


def decode_entry(buf) -> Entry:
    e = Entry()
    for num, wt, v in fields(buf):
        if num == 1:
            _want(wt, 0, "dtype")
            e.dtype = signed32(v)
        elif num == 2:
            _want(wt, 2, "shape")
            _decode_shape(v, e)
        elif num == 3:
            _want(wt, 0, "shard_id")
            e.shard_id = signed32(v)
        elif num == 4:
            _want(wt, 0, "offset")
            e.offset = signed64(v)
        elif num == 5:
            _want(wt, 0, "size")
            e.size = signed64(v)
        elif num == 6:
            _want(wt, 5, "crc32c")
            e.crc32c = v
        elif num == 7:
            _want(wt, 2, "slices")
            e.slices.append(_decode_slice(v))
    return e


def encode_entry(dtype: int, shape, shard_id: int, offset: int, size: int, crc: int) -> bytes:
    dims = b"".join(len_field(2, varint_field(1, d) if d else b"") for d in shape)
    out = varint_field(1, dtype) + len_field(2, dims)
    if shard_id:
        out += varint_field(3, shard_id)
    if offset:
        out += varint_field(4, offset)
    if size:
        out += varint_field(5, size)
    return out + tag(6, 5) + struct.pack("<I", crc)


# --------------------------------------------------------------------------- the table (LevelDB format)


class TableError(ValueError):
    pass


class CompressedIndex(Exception):
    """A snappy-compressed block and no decompressor installed."""


def _snappy(data: bytes) -> bytes:
    try:
        import cramjam
    except ImportError:
        raise CompressedIndex from None
    try:
        return bytes(cramjam.snappy.decompress_raw(data))
    except Exception as e:  # cramjam raises its own DecompressionError
        raise TableError(f"a snappy block does not decompress ({e})") from None


def _read_block(raw: bytes, handle: bytes) -> bytes:
    off, j = read_varint(handle, 0)
    size, _ = read_varint(handle, j)
    if off + size + 5 > len(raw):
        raise TableError(f"a block ({off}+{size}) is beyond the end of the file ({len(raw)} bytes)")
    kind = raw[off + size]
    (stored,) = struct.unpack_from("<I", raw, off + size + 1)
    if masked_crc32c(raw[off:off + size + 1]) != stored:
        raise TableError(f"block checksum mismatch at offset {off}")
    blk = raw[off:off + size]
    if kind == 1:
        blk = _snappy(blk)
    elif kind != 0:
        raise TableError(f"unknown block compression {kind}")
    return blk


def _block_entries(blk: bytes) -> list[tuple[bytes, bytes]]:
    if len(blk) < 4:
        raise TableError("a block is too short")
    (nr,) = struct.unpack_from("<I", blk, len(blk) - 4)
    end = len(blk) - 4 * (nr + 1)
    if end < 0:
        raise TableError("a block's restart array is larger than the block")
    out, key, i = [], b"", 0
    while i < end:
        shared, i = read_varint(blk, i)
        nonshared, i = read_varint(blk, i)
        vlen, i = read_varint(blk, i)
        if shared > len(key) or i + nonshared + vlen > end:
            raise TableError("a block entry overruns its block")
        key = key[:shared] + blk[i:i + nonshared]
        i += nonshared
        out.append((key, blk[i:i + vlen]))
        i += vlen
    return out


def read_table(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a table, in order; every block checksum checked.
    TableError if it is not a valid table; CompressedIndex for a snappy block
    without cramjam."""
    try:
        if len(raw) < 48:
            raise TableError(f"{len(raw)} bytes: too short for a table")
        if struct.unpack_from("<Q", raw, len(raw) - 8)[0] != TABLE_MAGIC:
            raise TableError("not a table (bad magic number)")
        footer = raw[-48:]
        _, i = read_varint(footer, 0)
        _, i = read_varint(footer, i)
        index = _read_block(raw, footer[i:])
        entries = []
        for _, handle in _block_entries(index):
            entries += _block_entries(_read_block(raw, handle))
        return entries
    except WireError as e:
        raise TableError(str(e)) from None


def _block(entries, restart_interval: int = 16) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for n, (k, v) in enumerate(entries):
        shared = 0
        if n % restart_interval == 0:
            restarts.append(len(out))
        else:
            m = min(len(k), len(prev))
            while shared < m and k[shared] == prev[shared]:
                shared += 1
        out += varint(shared) + varint(len(k) - shared) + varint(len(v))
        out += k[shared:]
        out += v
        prev = k
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def write_table(entries, block_size: int = 256 << 10) -> bytes:
    """A table of ``entries`` (sorted, unique keys), uncompressed, as
    TensorFlow's table builder writes it: data blocks of about ``block_size``
    bytes, an empty metaindex block, the index block (each data block's last key
    and handle), the footer."""
    out = bytearray()

    def put(block: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(block))
        out.extend(block)
        out.extend(b"\x00" + struct.pack("<I", masked_crc32c(block + b"\x00")))
        return handle

    index, pending, size = [], [], 0
    for k, v in entries:
        pending.append((k, v))
        size += len(k) + len(v) + 8
        if size >= block_size:
            index.append((k, put(_block(pending))))
            pending, size = [], 0
    if pending or not index:
        index.append((pending[-1][0] if pending else b"", put(_block(pending))))
    meta_h = put(_block([]))
    index_h = put(_block(index, restart_interval=1))
    footer = meta_h + index_h
    out += footer + b"\x00" * (40 - len(footer)) + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out)


# --------------------------------------------------------------------------- reading


def _key_text(key: bytes) -> str:
    """An index key for messages: a slice's key (OrderedCode) shown as its variable's name."""
    if key[:1] == b"\x00":
        name, i = bytearray(), 1
        while i + 1 < len(key) and key[i:i + 2] != b"\x00\x01":
            name.append(key[i])
            i += 2 if key[i] in (0, 0xFF) else 1
        return name.decode("utf-8", "backslashreplace") + " (a stored slice)"
    return key.decode("utf-8", "backslashreplace")


def _ordered_string(s: bytes) -> bytes:
    """tensorflow::strings::OrderedCode::WriteString."""
    out = bytearray()
    for c in s:
        out += b"\x00\xff" if c == 0 else (b"\xff\x00" if c == 0xFF else bytes((c,)))
    return bytes(out) + b"\x00\x01"


def _ordered_num(n: int) -> bytes:
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([len(b)]) + b


_SIGNED_HEADER = {1: (0x80, 0), 2: (0xC0, 0), 3: (0xE0, 0), 4: (0xF0, 0), 5: (0xF8, 0), 6: (0xFC, 0), 7: (0xFE, 0),
                  8: (0xFF, 0), 9: (0xFF, 0x80), 10: (0xFF, 0xC0)}


def _ordered_signed(v: int) -> bytes:
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([(0x80 ^ v) & 0xFF])
    n = x.bit_length() // 7 + 1
    buf = bytearray((b"\xff\xff" if v < 0 else b"\x00\x00") + (v & (2**64 - 1)).to_bytes(8, "big"))[10 - n:]
    buf[0] ^= _SIGNED_HEADER[n][0]
    buf[1] ^= _SIGNED_HEADER[n][1]
    return bytes(buf)


def slice_key(name: bytes, extents) -> bytes:
    """checkpoint::EncodeTensorNameSlice: the key a stored slice is saved under."""
    key = _ordered_num(0) + _ordered_string(name) + _ordered_num(len(extents))
    for start, length in extents:
        key += _ordered_signed(start) + _ordered_signed(length)
    return key


def _shard_path(prefix: str, shard: int, n: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{n:05d}"


class Bundle:
    """A bundle's index, checked as a whole when opened: what TensorFlow's own
    reader would CHECK (abort on) or trust is refused here with a clean error
    (every entry parses; keys sorted and unique; shapes valid; every tensor's
    bytes inside its data file with the size its dtype and shape need; every
    slice of a partitioned variable inside it and stored under its key).

    ``tensors``: name -> (dtype name, shape), the checkpoint's variables as
    ``tf.train.load_checkpoint`` lists them (stored slices are not listed).
    ``read(name)``: the values (a read-only view of the mapped data file for
    numeric tensors, whose crc32c is checked on the first read; an object array
    of bytes for strings; a new array assembled from the slices for a
    partitioned variable)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.index = prefix + ".index"
        try:
            with open(self.index, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise EmaError(f"cannot read: {e.strerror}", path=self.index) from None
        try:
            table = read_table(raw)
        except TableError as e:
            raise EmaError(f"not a readable TensorFlow checkpoint index: {e}", path=self.index) from None
        except CompressedIndex:
            raise EmaError(f"the index has snappy-compressed blocks, which need a snappy decompressor: {SNAPPY_HINT}",
                           path=self.index) from None
        del raw
        self._lock = threading.Lock()
        self._maps: dict[int, object] = {}
        self._verified: set[str] = set()
        self._parse(table)

    def _bad(self, msg: str, key: bytes | None = None, path: str | None = None, what: str = "corrupt index"):
        return EmaError(f"{what}: {msg}", path=path or self.index, tensor=None if key is None else _key_text(key))

    def _parse(self, table) -> None:
        if not table:
            raise EmaError("not a readable TensorFlow checkpoint index: it holds no entry (no bundle header)",
                           path=self.index)
        if table[0][0] != HEADER_KEY:
            raise self._bad("no bundle header (the first key is not the empty key)", table[0][0])
        try:
            h = decode_header(table[0][1])
        except WireError as e:
            raise EmaError(f"not a readable TensorFlow checkpoint index: unreadable bundle header ({e})",
                           path=self.index) from None
        if h.endianness != 0:
            raise EmaError("a big-endian bundle: not supported", path=self.index)
        if h.producer < 0:  # TensorFlow's CheckVersions: below kTensorBundleMinProducer (0)
            raise EmaError(f"not a readable TensorFlow checkpoint index: bundle producer version {h.producer} "
                           "(below 0)", path=self.index)
        if h.min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in h.bad_consumers:
            raise EmaError(f"written by a newer TensorFlow (bundle version {h.producer}, readers >= {h.min_consumer})",
                           path=self.index)
        if h.num_shards < 1:
            raise self._bad(f"the header says {h.num_shards} data shards")
        self.num_shards = h.num_shards
        self.entries: dict[bytes, Entry] = {}
        prev = None
        for key, value in table[1:]:
            if prev is not None and key <= prev:
                raise self._bad("the index holds this tensor twice" if key == prev else "keys out of order", key)
            prev = key
            if key == HEADER_KEY:
                raise self._bad("the index holds this tensor twice", key)
            try:
                self.entries[key] = decode_entry(value)
            except WireError as e:
                raise self._bad(f"unreadable entry ({e})", key) from None
        self._sizes: dict[int, int] = {}
        self.tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        for key, e in self.entries.items():
            if key[:1] == b"\x00":
                continue  # a stored slice: checked with its variable
            name = key.decode("utf-8", "surrogateescape")
            self._check(key, e)
            self.tensors[name] = (DTYPE_NAMES[e.dtype], tuple(e.shape))

    def _numel(self, key: bytes, e: Entry) -> int:
        if e.unknown_rank:
            raise self._bad("a shape of unknown rank", key)
        if len(e.shape) > 64:
            raise self._bad(f"{len(e.shape)} dimensions", key)
        n = 1
        for d in e.shape:
            n *= d
            if d < 0 or n >= 2**63:
                raise self._bad(f"invalid shape {e.shape}", key)
        return n

    def _check(self, key: bytes, e: Entry) -> None:
        n = self._numel(key, e)
        if e.dtype not in DTYPE_NAMES:
            raise EmaError(f"dtype {dtype_text(e.dtype)} is not supported", path=self.prefix, tensor=_key_text(key))
        if e.slices:
            self._check_slices(key, e, n)
        else:
            self._check_stored(key, e, n)

    def data_file(self, shard: int) -> str:
        return _shard_path(self.prefix, shard, self.num_shards)

    def _check_stored(self, key: bytes, e: Entry, n: int) -> None:
        if not 0 <= e.shard_id < self.num_shards:
            raise self._bad(f"data shard {e.shard_id} of {self.num_shards}", key)
        if e.shard_id not in self._sizes:
            shard = self.data_file(e.shard_id)
            try:
                self._sizes[e.shard_id] = os.path.getsize(shard)
            except OSError:
                raise EmaError("data file is missing", path=shard) from None
        if e.offset < 0 or e.size < 0:
            raise self._bad(f"stored at offset {e.offset}, {e.size} bytes", key)
        if e.offset + e.size > self._sizes[e.shard_id]:
            raise self._bad(f"its bytes {e.offset}..{e.offset + e.size} are beyond the end of the file "
                            f"({self._sizes[e.shard_id]} bytes)", key, what="truncated or corrupt data",
                            path=self.data_file(e.shard_id))
        name = DTYPE_NAMES[e.dtype]
        if name == "string":
            if e.size < n + 4:  # a length byte per element at least, and the lengths' checksum
                raise self._bad(f"{e.size} bytes stored for {n} strings", key)
        elif e.size != n * dtypes.itemsize(name):
            raise self._bad(f"{e.size} bytes stored for {n} elements of dtype {name}", key)

    def _check_slices(self, key: bytes, full: Entry, n: int) -> None:
        dims = full.shape
        covered = 0
        seen = set()
        for extents in full.slices:
            skey = slice_key(key, extents)
            if skey in seen:
                raise self._bad(f"the slice {extents} is listed twice", key)
            seen.add(skey)
            if len(extents) != len(dims):
                raise self._bad(f"a slice of rank {len(extents)} of a rank-{len(dims)} partitioned variable", key)
            shape = []
            for (start, length), dim in zip(extents, dims):
                if start < 0 or (length != -1 and (length < 0 or start + length > dim)) or (length == -1 and start):
                    raise self._bad(f"slice {extents} outside the shape {dims}", key)
                shape.append(dim if length == -1 else length)
            stored = self.entries.get(skey)
            if stored is None:
                raise self._bad(f"the stored slice {extents} of the partitioned variable is missing", key)
            if stored.dtype != full.dtype or stored.shape != shape or stored.slices or stored.unknown_rank:
                raise self._bad(f"the stored slice {extents} (dtype {stored.dtype}, shape {stored.shape}) does not "
                                f"match the partitioned variable (dtype {full.dtype}, slice shape {shape})", key)
            sn = self._numel(key, stored)
            self._check_stored(key, stored, sn)
            covered += sn
        if covered < n:
            raise self._bad(f"its slices hold {covered} of its {n} elements", key)

    # -- data

    def _map(self, shard: int):
        m = self._maps.get(shard)
        if m is None:
            with self._lock:
                m = self._maps.get(shard)
                if m is None:
                    m = self._maps[shard] = _open_map(self.data_file(shard), self._sizes.get(shard, 0))
        return m

    def _view(self, e: Entry) -> memoryview:
        m = self._map(e.shard_id)
        view = m.view
        if view is None:
            raise EmaError("internal: read after close", path=self.prefix)
        return view[e.offset:e.offset + e.size]

    def _corrupt(self, e: Entry, key: bytes, msg: str) -> EmaError:
        return EmaError(f"truncated or corrupt data: {msg}", path=self.data_file(e.shard_id), tensor=_key_text(key))

    def _verify(self, key: bytes, e: Entry, view, release=None) -> None:
        crc = 0
        for i in range(0, len(view), 8 * _CHUNK):
            part = view[i:i + 8 * _CHUNK]
            crc = crc32c(part, crc)
            if release is not None:
                release(i, i + len(part))
        if mask(crc) != e.crc32c:
            raise self._corrupt(e, key, "checksum mismatch (the data file does not hold what its index says)")

    def read(self, name: str) -> np.ndarray:
        key = name.encode("utf-8", "surrogateescape")
        e = self.entries[key]
        dt = DTYPE_NAMES[e.dtype]
        if e.slices:
            return self._assemble(key, e, dt)
        if dt == "string":
            return self._strings(key, e)
        view = self._view(e)
        if name not in self._verified:
            self._verify(key, e, view, release=lambda a, b: self._drop(e, a, b))
            self._verified.add(name)
        arr = np.frombuffer(view, dtype=dtypes.to_numpy(dt), count=self._numel(key, e))
        return arr.reshape(e.shape)

    def read_stream(self, name: str):
        """A numeric tensor as a flat array for the kernel to stream through, its
        crc32c checked just ahead of the kernel's reads (``CheckedStream``):
        the data is read from the page cache once, not once for the checksum and
        again for the sum (strings, slices and checked tensors: ``read``)."""
        key = name.encode("utf-8", "surrogateescape")
        e = self.entries[key]
        dt = DTYPE_NAMES[e.dtype]
        if e.slices or dt == "string" or name in self._verified:
            return self.read(name).reshape(-1)
        view = self._view(e)
        arr = np.frombuffer(view, dtype=dtypes.to_numpy(dt), count=self._numel(key, e))
        return CheckedStream(arr, _Check(self, key, e, view, name))

    def _assemble(self, key: bytes, full: Entry, dt: str) -> np.ndarray:
        if dt == "string":
            out = np.empty(full.shape, dtype=object)
        else:
            out = np.empty(full.shape, dtype=dtypes.to_numpy(dt))
        for extents in full.slices:
            stored = self.entries[slice_key(key, extents)]
            if dt == "string":
                part = self._strings(key, stored)
            else:
                view = self._view(stored)
                self._verify(key, stored, view)
                part = np.frombuffer(view, dtype=out.dtype, count=self._numel(key, stored)).reshape(stored.shape)
            idx = tuple(slice(None) if ln == -1 else slice(s, s + ln) for s, ln in extents)
            out[idx] = part
        return out

    def _strings(self, key: bytes, e: Entry) -> np.ndarray:
        raw = bytes(self._view(e))
        n = self._numel(key, e)
        out = np.empty(n, dtype=object)
        try:
            lengths, i = [], 0
            crc = 0
            ext = _crc_lib()
            for _ in range(n):
                ln, i = read_varint(raw, i)
                lengths.append(ln)
                crc = ext(crc, struct.pack("<I", ln) if ln <= 0xFFFFFFFF else struct.pack("<Q", ln))
            if i + 4 > len(raw):
                raise WireError("truncated")
            (stored,) = struct.unpack_from("<I", raw, i)
            if stored != mask(crc):
                raise self._corrupt(e, key, "checksum mismatch in a string tensor's lengths")
            crc = ext(crc, raw[i:i + 4])
            i += 4
            if i + sum(lengths) != len(raw):
                raise WireError(f"{len(raw)} bytes stored for strings of {i + sum(lengths)}")
            for k, ln in enumerate(lengths):
                out[k] = raw[i:i + ln]
                i += ln
            crc = ext(crc, raw[len(raw) - sum(lengths):])
        except WireError as err:
            raise self._corrupt(e, key, f"unreadable string tensor ({err})") from None
        if mask(crc) != e.crc32c:
            raise self._corrupt(e, key, "checksum mismatch (the data file does not hold what its index says)")
        return out.reshape(e.shape)

    def _drop(self, e: Entry, first: int, last: int) -> None:
        """MADV_DONTNEED over whole pages of bytes [first, last) of the entry."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = -(-(e.offset + first) // mmap.PAGESIZE) * mmap.PAGESIZE
        stop = (e.offset + last) // mmap.PAGESIZE * mmap.PAGESIZE
        if stop - start >= 1 << 19:
            self._map(e.shard_id).advise(mmap.MADV_DONTNEED, start, stop - start)

    def prefetch(self, name: str, first: int = 0, last: int | None = None) -> bool:
        """Elements ``[first, last)`` will be read soon (``safetensors_fmt._Map.willneed``;
        True: this reader reads ahead)."""
        e = self.entries.get(name.encode("utf-8", "surrogateescape"))
        if e is None or e.slices or DTYPE_NAMES.get(e.dtype) == "string":
            return True  # (not this tensor)
        item = dtypes.itemsize(DTYPE_NAMES[e.dtype])
        end = e.size if last is None else min(last * item, e.size)
        return self._map(e.shard_id).willneed(e.offset + first * item, e.offset + end)

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """Done with the tensor (or its elements ``[first, last)``): its mapped
        pages leave this process (they stay in the page cache)."""
        e = self.entries.get(name.encode("utf-8", "surrogateescape"))
        if e is None or e.slices or DTYPE_NAMES.get(e.dtype) == "string" or e.shard_id not in self._maps:
            return
        if last is None:
            self._drop(e, 0, e.size)
        else:
            item = dtypes.itemsize(DTYPE_NAMES[e.dtype])
            self._drop(e, first * item, min(last * item, e.size))

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps = {}


class _Check:
    """The running crc32c of one tensor's mapped bytes, checked up to ``done``."""

    __slots__ = ("bundle", "key", "entry", "view", "name", "done", "crc", "lock")
    # bytes checked at a time, just ahead of the kernel's reads: one kernel block of float32 (64K
    # elements), so the checked bytes are still in the core's L2 cache when the kernel reads them.
    # 4 MiB steps (every input's step in flight, two workers) outgrew it: a TF -> safetensors run
    # on one thread took 1.19 s against 1.42 s (medians of 10, alternating; user CPU 0.74 s
    # against 0.87 s; AMD EPYC VM, 1 MiB L2)
    STEP = 256 << 10

    def __init__(self, bundle: "Bundle", key: bytes, entry: Entry, view, name: str):
        self.bundle, self.key, self.entry, self.view, self.name = bundle, key, entry, view, name
        self.done, self.crc = 0, 0
        self.lock = threading.Lock()

    def upto(self, end: int) -> None:
        """Check the bytes before ``end`` (and a step beyond); at the last byte,
        compare with the index's crc32c (a mismatch: the error, before any sum
        of these bytes is written)."""
        if end <= self.done:
            return
        with self.lock:
            total = len(self.view)
            while self.done < end:
                stop = min(total, max(end, self.done + self.STEP))
                self.crc, self.done = crc32c(self.view[self.done:stop], self.crc), stop
            if self.done == total:
                if mask(self.crc) != self.entry.crc32c:
                    raise self.bundle._corrupt(self.entry, self.key, "checksum mismatch (the data file does not "
                                               "hold what its index says)")
                self.bundle._verified.add(self.name)


class CheckedStream(FlatStream):
    """A tensor's mapped elements as a flat array-like (``storage.FlatStream``)
    whose slices are handed out only once the crc32c has covered them: the
    checksum pass runs one step (``_Check.STEP``) ahead of the kernel over the same pages, instead
    of a whole pass of its own (which, for tensors larger than the CPU's caches,
    read the data twice)."""

    def __init__(self, arr: np.ndarray, check: _Check):
        super().__init__(arr.dtype, arr.size)
        self._a, self._c = arr, check

    def view(self, dtype) -> "CheckedStream":
        return CheckedStream(self._a.view(dtype), self._c)

    def _slice(self, a: int, b: int):
        self._c.upto(b * self.dtype.itemsize)
        return self._a[a:b]

    def __array__(self, dtype=None, copy=None):
        self._c.upto(len(self._c.view))
        return self._a if dtype is None else self._a.astype(dtype)


class _Empty:
    view = memoryview(b"")

    def willneed(self, *a):
        return True

    def advise(self, *a):
        pass

    def close(self):
        pass


def _open_map(path: str, size: int):
    from ema_cli.formats.safetensors_fmt import _Map

    if size == 0:
        return _Empty()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise EmaError(f"cannot open: {e.strerror}", path=path) from None
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise EmaError(f"truncated or corrupt data: the file shrank to {actual} bytes", path=path)
        # (no MADV_SEQUENTIAL, as for safetensors: workers read different tensors of one
        # file at once, and it shrank the kernel's read-ahead there; see safetensors_fmt)
        return _Map(fd, actual)
    except OSError as e:
        raise EmaError(f"cannot read: {e.strerror}", path=path) from None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- writing


def encode_strings(values) -> tuple[bytes, int]:
    """A string tensor's bytes in a data file and its (unmasked) crc32c."""
    ext = _crc_lib()
    items = [bytes(v) if not isinstance(v, str) else v.encode("utf-8") for v in values]
    lengths = b"".join(varint(len(b)) for b in items)
    crc = 0
    for b in items:
        crc = ext(crc, struct.pack("<I", len(b)) if len(b) <= 0xFFFFFFFF else struct.pack("<Q", len(b)))
    lc = struct.pack("<I", mask(crc))
    crc = ext(crc, lc)
    body = b"".join(items)
    crc = ext(crc, body)
    return lengths + lc + body, crc


ALIGN = 64  # tensor offsets in the data files (TensorFlow reads any offset; aligned views are faster)


class BundleWriter:
    """Writes the bundle ``prefix`` as tensors arrive, holding none of them whole.

    ``shards``: the output's data files, each a list of ``(name, dtype, shape)``.
    Every numeric tensor's place is known up front (shard, offset: in key
    order), so ``write`` and ``write_range`` (elements ``[start, start +
    n)``, in any order, from any thread) ``pwrite`` straight to it; the crc32c
    is extended as ranges arrive in order (a range out of order: it is computed
    from the file at close).  String tensors, small, are kept until ``close``,
    which appends them, then writes the ``.index`` (header and entries in key
    order).  ``reserve``: called with the number of bytes the data files take,
    before any is written (the caller turns a failure into its message)."""

    def __init__(self, prefix: str, shards, shown: str):
        from ema_cli.formats.safetensors_fmt import _pwrite_all, _start_writeback

        self._pwrite, self._writeback = _pwrite_all, _start_writeback
        self.prefix, self.shown = prefix, shown
        self.n = max(1, len(shards))
        self.layout: dict[str, tuple[int, int, str, tuple[int, ...], int]] = {}  # shard, offset, dtype, shape, size
        self.ends: list[int] = []
        for s, infos in enumerate(shards or [[]]):
            pos = 0
            for name, dt, shape in sorted(infos, key=lambda t: t[0].encode("utf-8")):
                if dt not in DTYPE_ENUMS:
                    raise EmaError(f"a TensorFlow checkpoint cannot store dtype {dt}", tensor=name)
                if dt == "string":
                    self.layout[name] = (s, -1, dt, tuple(shape), 0)
                    continue
                size = int(np.prod(shape, dtype=object)) * dtypes.itemsize(dt)
                pos = -(-pos // ALIGN) * ALIGN
                self.layout[name] = (s, pos, dt, tuple(shape), size)
                pos += size
            self.ends.append(pos)
        self._crc: dict[str, list] = {}  # name -> [next element, crc] (None: recompute at close)
        self._done: set[str] = set()
        self._strings: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.fds: list[int] = []
        try:
            for s in range(self.n):
                self.fds.append(os.open(_shard_path(prefix, s, self.n), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
        except OSError as e:
            self.abort()
            raise EmaError(f"cannot create: {e.strerror}", path=shown) from None

    def data_bytes(self) -> int:
        return sum(self.ends)

    def reserve(self) -> None:
        """The data files' space, taken before any work (a full disk fails here)."""
        for fd, end in zip(self.fds, self.ends):
            if end:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, end)
                else:  # pragma: no cover (not Linux)
                    os.ftruncate(fd, end)

    def _write_at(self, name: str, fd: int, where: int, data: memoryview) -> None:
        try:
            self._pwrite(fd, data, where)
            self._writeback(fd, where, len(data))
        except OSError as e:
            raise EmaError(f"cannot write: {e.strerror}", path=self.shown, tensor=name) from None

    def write(self, name: str, arr: np.ndarray) -> None:
        s, off, dt, shape, size = self.layout[name]
        if dt == "string":
            a = np.asarray(arr, dtype=object)
            if a.shape != shape:
                raise EmaError(f"internal: shape {a.shape} != {shape}", tensor=name)
            with self._lock:
                self._strings[name] = a
                self._done.add(name)
            return
        a = np.asarray(arr, dtype=dtypes.to_numpy(dt))
        if a.shape != shape:
            raise EmaError(f"internal: shape {a.shape} != {shape}", tensor=name)
        self.write_range(name, 0, np.ascontiguousarray(a).reshape(-1))

    def write_range(self, name: str, start: int, flat: np.ndarray) -> None:
        s, off, dt, shape, size = self.layout[name]
        item = dtypes.itemsize(dt)
        numel = size // item if item else 0
        if (dt == "string" or flat.dtype != dtypes.to_numpy(dt) or flat.ndim != 1 or not flat.flags.c_contiguous
                or not 0 <= start <= numel - flat.size):
            raise EmaError(f"internal: bad range {start}+{flat.size} ({flat.dtype}) of {numel} {dt}", tensor=name)
        data = memoryview(flat.view(np.uint8))
        self._write_at(name, self.fds[s], off + start * item, data)
        st = self._crc.setdefault(name, [0, 0])
        if st[1] is not None:
            if st[0] == start:
                st[1] = crc32c(data, st[1])
                st[0] = start + flat.size
            else:
                st[1] = None  # out of order: from the file at close
        if start + flat.size == numel:
            with self._lock:
                self._done.add(name)

    def _crc_from_file(self, name: str) -> int:
        s, off, dt, shape, size = self.layout[name]
        crc, pos = 0, 0
        while pos < size:
            chunk = os.pread(self.fds[s], min(8 * _CHUNK, size - pos), off + pos)
            if not chunk:
                raise EmaError("internal: the data file is shorter than written", path=self.shown, tensor=name)
            crc = crc32c(chunk, crc)
            pos += len(chunk)
        return crc

    def close(self) -> None:
        missing = [n for n in self.layout if n not in self._done and self.layout[n][4] > 0]
        missing += [n for n in self.layout if self.layout[n][2] == "string" and n not in self._strings]
        if missing:
            raise EmaError(f"internal: {len(missing)} tensors never written", path=self.shown, tensor=missing[0])
        entries = []
        ends = list(self.ends)
        for name in sorted(self.layout, key=lambda n: n.encode("utf-8")):
            s, off, dt, shape, size = self.layout[name]
            if dt == "string":
                blob, crc = encode_strings(self._strings[name].reshape(-1))
                off, size = ends[s], len(blob)
                self._write_at(name, self.fds[s], off, memoryview(blob))
                ends[s] += size
            else:
                st = self._crc.get(name)
                crc = st[1] if st is not None and st[1] is not None and st[0] * max(1, dtypes.itemsize(dt)) == size \
                    else (0 if size == 0 else self._crc_from_file(name))
            entries.append((name.encode("utf-8"), encode_entry(DTYPE_ENUMS[dt], shape, s, off, size, mask(crc))))
        try:
            for fd, end in zip(self.fds, ends):
                os.ftruncate(fd, end)  # (a reservation beyond the data, if any)
                os.fsync(fd)
        except OSError as e:
            raise EmaError(f"cannot write: {e.strerror}", path=self.shown) from None
        finally:
            self.abort()
        table = write_table([(HEADER_KEY, encode_header(self.n))] + entries)
        try:
            with open(self.prefix + ".index", "wb") as fh:
                fh.write(table)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise EmaError(f"cannot write: {e.strerror}", path=self.shown) from None

    def abort(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
