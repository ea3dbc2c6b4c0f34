"""TensorFlow checkpoints (TF1 name-based and TF2 object-based, V2 bundle format).

A checkpoint is a *prefix* (``run/model.ckpt-1200``) with an ``.index`` file,
one or more ``.data-NNNNN-of-MMMMM`` files and, for TF1 Savers, a ``.meta``
graph.  Discovery (``claim_path``, ``scan_dir``) only looks at file names, so
listing inputs never imports TensorFlow; the Reader and Writer import it
lazily through :func:`import_tf`, with its logging silenced.

Reading goes through ``tf.train.load_checkpoint``: the shape and dtype maps come
from the index alone, ``get_tensor`` reads one tensor (partitioned variables
come back whole).  Writing buffers a bounded batch of tensors, saves each batch
with ``tf.raw_ops.SaveV2`` to a temporary prefix and joins the batches with
``tf.raw_ops.MergeV2Checkpoints``, as TensorFlow's own sharded saver does.
Every dtype is kept and every string tensor (the TF2 object graph, Keras
config JSON) copied byte for byte, so ``tf.train.Checkpoint.restore`` and
``Saver.restore`` accept the result.

What each tensor is (``TFReader.role``, which decides what is averaged by
default), from the most reliable source present:

1. an object-based (TF2) checkpoint's ``_CHECKPOINTABLE_OBJECT_GRAPH``: the
   rule in :mod:`ema_cli.formats.tf_objgraph` (model variables are those
   reachable from the root without entering an optimizer node, whatever key
   TensorFlow chose; slots and the optimizer's own variables are optimizer
   state; ``save_counter`` a counter);
2. a TF1 ``.meta`` beside the checkpoint (:func:`averaged_names`): its
   ``trainable_variables`` are parameters, its ``moving_average_variables``
   that are not trainable are buffers (both averaged: the set TensorFlow's
   ExponentialMovingAverage maintains); every other variable is copied;
3. otherwise the name rules (:func:`is_model_variable`): every float tensor
   except optimizer state, existing moving-average shadows and bookkeeping
   counters.

The step (``TFReader.step``): the object graph's step counter (a root
``global_step``/``step``, else the optimizer's iterations, whatever their keys),
else the first of :data:`STEP_KEYS`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from ema_cli import dtypes
from ema_cli.notices import warn
from ema_cli.errors import EmaError
from ema_cli.formats.base import (BUFFER, COUNTER, OPTIMIZER, OTHER, PARAMETER, Reader, Role, Source, TensorInfo,
                                  Writer, is_buffer_name, step_from_scalar)
from ema_cli.output import Staged, _fsync_dir, check_target, fsync_file

NAME = "tf"
OUTPUT_SUFFIX = ".ckpt"
INDEX = ".index"
META = ".meta"
STATE_FILE = "checkpoint"  # tf.train.CheckpointState, text format
INSTALL_HINT = "needs TensorFlow: pip install 'ema-avg[tf]'"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

_DATA_RE = re.compile(r"^(?P<prefix>.+)\.data-(?P<shard>\d{5})-of-(?P<count>\d{5})$")

#: step counters, most specific first (TF1, then TF2 object-based keys)
STEP_KEYS = (
    "global_step",
    "global_step/.ATTRIBUTES/VARIABLE_VALUE",
    "step/.ATTRIBUTES/VARIABLE_VALUE",
    "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE",
    "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE",
    "optimizer/iterations/.ATTRIBUTES/VARIABLE_VALUE",
)

#: the canonical dtypes a TF checkpoint can hold (TF has no float8_e8m0fnu)
_STORABLE = frozenset(n for n in dtypes._NUMPY if n != "float8_e8m0fnu")

# --------------------------------------------------------------------------- TensorFlow import

_tf = None
_tf_lock = threading.Lock()


def import_tf(path: str | None = None):
    """``tensorflow``, imported on first use with its C++ and Python logging silenced.

    ``TF_CPP_MIN_LOG_LEVEL=3`` hides the C++ INFO/WARNING lines and
    ``TF_ENABLE_ONEDNN_OPTS=0`` the oneDNN banner (which level 3 alone does not
    hide); values the user set are kept.  Without TensorFlow: an EmaError naming
    ``path`` with the install hint."""
    global _tf
    if _tf is not None:
        return _tf
    with _tf_lock:
        if _tf is not None:
            return _tf
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        try:
            with warnings.catch_warnings(), _stderr_silenced():
                warnings.simplefilter("ignore")
                import tensorflow as tf

                tf.constant(0)  # device set-up logs (cudart_stub) once, now, while silenced
        except ImportError as e:
            missing = getattr(e, "name", None)
            detail = "" if missing in (None, "tensorflow") else f" (importing it failed: {e})"
            raise EmaError(INSTALL_HINT + detail, path=path) from None
        except Exception as e:  # a broken installation
            raise EmaError(f"TensorFlow failed to import: {type(e).__name__}: {e}", path=path) from None
        try:
            tf.get_logger().setLevel("ERROR")
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.ERROR)
        except Exception:  # logging is cosmetic
            pass
        _tf = tf
    return _tf


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 pointed at /dev/null: the full ``tensorflow`` package logs
    ``cudart_stub.cc ... Could not find cuda drivers`` from C++ before absl is
    initialised, which no log level silences.  Python exceptions are unaffected."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no usable fd 2: nothing to silence
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _tf_message(e: BaseException) -> str:
    """TensorFlow's error text without its op/node decorations."""
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    msg = msg.split("\n\t")[0]
    msg = re.sub(r"\s*\[Op:\w+\].*$", "", msg)
    return " ".join(msg.split())


def _tf_dtype_name(tf_dtype) -> str | None:
    name = getattr(tf_dtype, "name", str(tf_dtype))
    if name == "half":
        name = "float16"
    return name if dtypes.known(name) else None


def can_store(dtype: str) -> bool:
    return dtype in _STORABLE


# --------------------------------------------------------------------------- discovery


def is_output(path: str) -> bool:
    return path.endswith(OUTPUT_SUFFIX)


def data_files(prefix: str) -> list[str]:
    """The ``.data-*-of-*`` files of a prefix, sorted."""
    return sorted(f for f in glob.glob(glob.escape(prefix) + ".data-*-of-*") if _DATA_RE.match(os.path.basename(f)))


def _source(prefix: str) -> Source:
    files = [prefix + INDEX, *data_files(prefix)]
    if os.path.isfile(prefix + META):
        files.append(prefix + META)
    return Source(NAME, prefix, tuple(files), name_hint=os.path.basename(prefix))


def _prefix_of(name: str) -> str | None:
    """The checkpoint prefix a file name belongs to, if it is one of its files."""
    for suffix in (INDEX, META):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    m = _DATA_RE.match(name)
    return m.group("prefix") if m else None


def claim_path(path: Path, *, skip_missing: bool = False) -> list[Source] | None:
    """A prefix, any of a checkpoint's files, or a ``checkpoint`` state file.
    ``skip_missing`` (``--skip-missing``): checkpoints a state file names that
    no longer exist are left out with a warning each, instead of an error."""
    p = str(path)
    if os.path.isfile(p + INDEX) and not p.endswith(INDEX):
        return [_source(p)]
    if os.path.isdir(p):
        return None
    if path.name == STATE_FILE and path.is_file():
        return _state_file_sources(path, skip_missing=skip_missing)
    prefix = _prefix_of(path.name)
    if prefix is not None and path.is_file():
        full = str(path.parent / prefix)
        if path.name.endswith(INDEX):
            return [_source(full)]
        if not os.path.isfile(full + INDEX):
            raise EmaError(f"the checkpoint's index {prefix}{INDEX} is missing (incomplete or deleted checkpoint)",
                           path=p)
        return [_source(full)]
    if not path.exists() and data_files(p):
        raise EmaError("missing: a checkpoint prefix needs its .index file (incomplete or deleted checkpoint)",
                       path=p + INDEX)
    return None


def scan_dir(path: Path) -> list[Source]:
    """Every checkpoint whose ``.index`` is in the directory (the ``checkpoint``
    state file often lists only the newest, so it is not used)."""
    out = []
    for f in sorted(path.glob("*" + INDEX)):
        if f.is_file() and not f.name.startswith("."):
            out.append(_source(str(f)[: -len(INDEX)]))
    return out


_STATE_LINE = re.compile(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"((?:[^"\\]|\\.)*)"\s*$')


def read_state_file(path: Path) -> list[str]:
    """Prefixes a ``checkpoint`` state file names (relative ones resolved against its directory)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        raise EmaError(f"cannot read: {e.strerror}", path=str(path)) from None
    named: dict[str, str] = {}
    for line in text.splitlines():
        m = _STATE_LINE.match(line)
        if m:
            name = re.sub(r"\\(.)", r"\1", m.group(2))
            full = name if os.path.isabs(name) else str(Path(path).parent / name)
            named.setdefault(full, m.group(1))
    return list(named)


def _state_file_sources(path: Path, *, skip_missing: bool = False) -> list[Source]:
    """The checkpoints a state file names, in its order.  The paths may lead
    outside its directory (TensorFlow writes absolute ones, and relative ones may
    hold ``..``).  A named checkpoint without its ``.index`` is an error, or with
    ``skip_missing`` a warning naming it (all of them missing: an error)."""
    prefixes = read_state_file(path)
    if not prefixes:
        raise EmaError("not a TensorFlow checkpoint state file (it names no checkpoint)", path=str(path))
    present = [p for p in prefixes if os.path.isfile(p + INDEX)]
    missing = [p for p in prefixes if p not in present]
    if missing and (not skip_missing or not present):
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = "; pass --skip-missing to average the others" if present else ""
        raise EmaError(f"names checkpoint {missing[0]}{more}, whose {INDEX} is missing (deleted?){hint}",
                       path=str(path))
    for p in missing:
        warn(f"{path}: left out {p}, which it names but whose {INDEX} is missing (--skip-missing)")
    return [_source(p) for p in present]


# --------------------------------------------------------------------------- which tensors are averaged

_OPTIMIZER_SEGMENT = re.compile(
    r"^(Adam|AdamW|LazyAdam|Nadam|Adamax|AMSGrad|Momentum|RMSProp|RMSprop|Adagrad|AdagradDA|ProximalAdagrad|"
    r"Adadelta|Ftrl|LARS|LARSOptimizer|LAMB|Lamb|Lion|Adafactor|SGD)(_\d+)?$"
)
_OPTIMIZER_GLOBAL = re.compile(r"^beta[12]_power(_\d+)?$")
_BOOKKEEPING = frozenset({"global_step", "save_counter", "step"})


def _name_rule(name: str) -> tuple[str, str]:
    """(kind, why) by the name rules; see :func:`is_model_variable`."""
    head = name.partition("/.ATTRIBUTES/")[0]
    segs = head.split("/")
    if segs[-1] in _BOOKKEEPING and len(segs) == 1 or segs[-1] == "global_step":
        return COUNTER, "name rules: step counter"
    if "optimizer" in segs or ".OPTIMIZER_SLOT" in segs:
        return OPTIMIZER, "name rules: optimizer state"
    if any(_OPTIMIZER_SEGMENT.match(s) for s in segs) or _OPTIMIZER_GLOBAL.match(segs[-1]):
        return OPTIMIZER, "name rules: optimizer state"
    if len(segs) > 1 and segs[-1].endswith("MovingAverage"):
        return OTHER, "name rules: moving-average shadow"
    if is_buffer_name(name):
        return BUFFER, "name rules: statistics buffer"
    return PARAMETER, "name rules: model variable"


def is_model_variable(name: str) -> bool:
    """The name rules used when neither an object graph nor a ``.meta`` says
    which variables are trained.

    False for optimizer state (TF2 ``optimizer/...`` anywhere in the path, as
    in ``model/optimizer/...``, and ``.OPTIMIZER_SLOT``; TF1 slots ``*/Adam``,
    ``*/Adam_1``, ``*/Momentum``, ``*/RMSProp*``, Keras ``training/Adam/...``;
    ``beta1_power``/``beta2_power``), moving-average shadows
    (``*/ExponentialMovingAverage``, ``*/SWAMovingAverage``; the ``--suffix``
    in use is handled by the engine), ``save_counter`` and ``global_step``."""
    return _name_rule(name)[0] in (PARAMETER, BUFFER)


def _name_rule_role(info: TensorInfo) -> Role:
    kind, why = _name_rule(info.name)
    if kind in (PARAMETER, BUFFER) and not dtypes.is_float(info.dtype):
        return Role(OTHER, f"{info.dtype}: not floating point")
    return Role(kind, why)


def _variable_key(vdef) -> str:
    """The checkpoint key a TF1 VariableDef is saved under (partitioned: the full name)."""
    full = vdef.save_slice_info_def.full_name
    if full:
        return full
    name = vdef.variable_name
    return name[: name.rindex(":")] if ":" in name else name


def read_meta_collections(meta_file: str) -> dict[str, list[str]]:
    """The checkpoint keys in a TF1 ``.meta``'s ``trainable_variables`` and
    ``moving_average_variables`` collections (missing collections: absent keys).

    Reused by the TF ``variables_to_restore`` name map."""
    tf = import_tf(meta_file)  # noqa: F841  (the protos below come with TensorFlow)
    from google.protobuf.message import DecodeError
    from tensorflow.core.framework import variable_pb2
    from tensorflow.core.protobuf import meta_graph_pb2

    try:
        with open(meta_file, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise EmaError(f"cannot read the .meta graph: {e.strerror}", path=meta_file) from None
    try:
        meta = meta_graph_pb2.MetaGraphDef.FromString(raw)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise EmaError(f"unreadable .meta graph (not a MetaGraphDef: {e}); move it away to use the name rules",
                       path=meta_file) from None
    out: dict[str, list[str]] = {}
    for key in ("trainable_variables", "moving_average_variables"):
        if key not in meta.collection_def:
            continue
        coll = meta.collection_def[key]
        kind = coll.WhichOneof("kind")
        names: list[str] = []
        try:
            if kind == "bytes_list":
                for b in coll.bytes_list.value:
                    names.append(_variable_key(variable_pb2.VariableDef.FromString(b)))
            elif kind == "node_list":
                names = [n.rsplit(":", 1)[0] for n in coll.node_list.value]
        except (DecodeError, ValueError) as e:
            raise EmaError(f"unreadable .meta graph: collection {key}: {e}", path=meta_file) from None
        out[key] = list(dict.fromkeys(names))
    return out


def averaged_names(meta_file: str | None, keys) -> set[str] | None:
    """The tensors TensorFlow's ExponentialMovingAverage maintains, from a
    ``.meta`` file: its trainable variables plus its moving-average variables,
    restricted to the checkpoint's keys.  None when there is no ``.meta``, it has
    neither collection, or none of its names is in the checkpoint (a Saver with
    custom names): then the name rules apply."""
    if not meta_file or not os.path.isfile(meta_file):
        return None
    colls = read_meta_collections(meta_file)
    if not colls:
        return None
    names = set(colls.get("trainable_variables", [])) | set(colls.get("moving_average_variables", []))
    keys = set(keys)
    found = names & keys
    return found if found else None


# --------------------------------------------------------------------------- index sanity
#
# TensorFlow's checkpoint reader trusts the entries of the .index: a negative or
# overflowing shape, an entry that does not parse, a slice listed twice, or a
# slice stored with another dtype than its variable aborts the process (a CHECK
# failure); a shape much larger than the data is allocated before the size is
# checked.  The table's block checksums only catch accidental corruption, so the
# entries are checked here first (_check_index).  The .index is an SSTable
# (LevelDB's format).  TensorFlow writes it uncompressed but also reads
# snappy-compressed blocks: those are decompressed with cramjam and checked
# alike, or refused when cramjam is missing, so no entry TensorFlow reads goes
# unchecked.  A table this small parser does not understand at all is left to
# TensorFlow, which checks its checksums itself.


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]  # IndexError past the end: caught by the caller
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80 or shift > 63:
            return n, i


class CompressedIndex(Exception):
    """An index block is snappy-compressed and no decompressor is installed."""


SNAPPY_HINT = "pip install cramjam (or 'ema-avg[tf]')"


_CRC32C_TABLE: list[int] = []


def _masked_crc32c(data: bytes) -> int:
    """LevelDB's masked CRC32C (pure Python: only compressed blocks, which are rare, need it)."""
    if not _CRC32C_TABLE:
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
            _CRC32C_TABLE.append(c)
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _snappy_decompress(data: bytes) -> bytes:
    try:
        import cramjam
    except ImportError:
        raise CompressedIndex from None
    try:
        return bytes(cramjam.snappy.decompress_raw(data))
    except Exception as e:  # cramjam raises its own DecompressionError
        raise ValueError(f"snappy: {e}") from None


def _table_entries(raw: bytes):
    """(key, value) pairs of an SSTable (blocks uncompressed or snappy-compressed);
    None if not understood.  A snappy block without :mod:`cramjam` raises
    :class:`CompressedIndex`; a block that does not decompress gives None."""
    import struct

    def block(off: int, size: int):
        if off < 0 or size < 0 or off + size + 5 > len(raw):
            return None  # out of range
        kind = raw[off + size]
        blk = raw[off:off + size]
        if kind == 1:
            if _masked_crc32c(raw[off:off + size + 1]) != struct.unpack_from("<I", raw, off + size + 1)[0]:
                return None  # corrupt, not compressed: TensorFlow reports the checksum mismatch
            try:
                blk = _snappy_decompress(blk)
            except ValueError:
                return None
            size = len(blk)
        elif kind != 0:
            return None
        if size < 4:
            return None
        (nr,) = struct.unpack_from("<I", blk, size - 4)
        end = size - 4 * (nr + 1)
        if end < 0:
            return None
        out, key, i = [], b"", 0
        while i < end:
            shared, i = _varint(blk, i)
            nonshared, i = _varint(blk, i)
            vlen, i = _varint(blk, i)
            if shared > len(key) or i + nonshared + vlen > end:
                return None
            key = key[:shared] + blk[i:i + nonshared]
            i += nonshared
            out.append((key, blk[i:i + vlen]))
            i += vlen
        return out

    try:
        if len(raw) < 48 or struct.unpack_from("<Q", raw, len(raw) - 8)[0] != 0xDB4775248B80FB57:
            return None
        footer = raw[-48:]
        _, i = _varint(footer, 0)
        _, i = _varint(footer, i)
        ioff, i = _varint(footer, i)
        isize, _ = _varint(footer, i)
        index = block(ioff, isize)
        if index is None:
            return None
        entries = []
        for _, handle in index:
            off, j = _varint(handle, 0)
            size, _ = _varint(handle, j)
            blk = block(off, size)
            if blk is None:
                return None
            entries += blk
        return entries
    except (IndexError, struct.error):
        return None


def _ordered_string(s: bytes) -> bytes:
    """tensorflow::strings::OrderedCode::WriteString."""
    out = bytearray()
    for c in s:
        out += b"\x00\xff" if c == 0 else (b"\xff\x00" if c == 0xFF else bytes((c,)))
    return bytes(out) + b"\x00\x01"


def _ordered_num(n: int) -> bytes:
    """OrderedCode::WriteNumIncreasing (n >= 0)."""
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([len(b)]) + b


_SIGNED_HEADER = {1: (0x80, 0), 2: (0xC0, 0), 3: (0xE0, 0), 4: (0xF0, 0), 5: (0xF8, 0), 6: (0xFC, 0), 7: (0xFE, 0),
                  8: (0xFF, 0), 9: (0xFF, 0x80), 10: (0xFF, 0xC0)}


def _ordered_signed(v: int) -> bytes:
    """OrderedCode::WriteSignedNumIncreasing."""
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([(0x80 ^ v) & 0xFF])
    n = x.bit_length() // 7 + 1
    buf = bytearray((b"\xff\xff" if v < 0 else b"\x00\x00") + (v & (2**64 - 1)).to_bytes(8, "big"))[10 - n:]
    buf[0] ^= _SIGNED_HEADER[n][0]
    buf[1] ^= _SIGNED_HEADER[n][1]
    return bytes(buf)


def _slice_key(name: bytes, extents: list[tuple[int, int]]) -> bytes:
    """checkpoint::EncodeTensorNameSlice: the key a stored slice is saved under."""
    key = _ordered_num(0) + _ordered_string(name) + _ordered_num(len(extents))
    for start, length in extents:
        key += _ordered_signed(start) + _ordered_signed(length)
    return key


def _key_name(key: bytes) -> str:
    """An index key for messages: a slice's key (OrderedCode) shown as its variable's name."""
    if key[:1] == b"\x00":
        name, i = bytearray(), 1
        while i + 1 < len(key) and key[i:i + 2] != b"\x00\x01":
            name.append(key[i])
            i += 2 if key[i] in (0, 0xFF) else 1  # \x00\xff is NUL, \xff\x00 is 0xff
        return name.decode("utf-8", "backslashreplace") + " (a stored slice)"
    return key.decode("utf-8", "backslashreplace")


def _tf_itemsize(enum: int) -> int | None:
    """Bytes per element of a DataType enum value: 0 for strings, None if unsupported."""
    try:
        name = _tf_dtype_name(import_tf().dtypes.as_dtype(enum))
    except (TypeError, ValueError, KeyError):
        return None
    return None if name is None else dtypes.itemsize(name)


def _check_index(prefix: str) -> None:
    """What TensorFlow's checkpoint reader assumes of its index and CHECKs (an
    abort) or does not check at all, verified before it opens the index: every
    entry parses; no key appears twice; no slice is listed twice; every shape has
    non-negative dimensions and fewer than 2**63 elements; every tensor's bytes lie inside its
    data file and have its size (so nothing larger than the files is allocated);
    every slice of a partitioned variable lies inside the variable and is stored
    under its key with the variable's dtype and the slice's shape."""
    index = prefix + INDEX
    try:
        with open(index, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise EmaError(f"cannot read: {e.strerror}", path=index) from None
    try:
        entries = _table_entries(raw)
    except CompressedIndex:
        raise EmaError("the index has snappy-compressed blocks, which ema-avg cannot check without a snappy "
                       f"decompressor (TensorFlow would trust them unchecked): {SNAPPY_HINT}", path=index) from None
    if entries is None:
        return  # not understood here: TensorFlow checks the table itself
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import tensor_bundle_pb2

    def bad(msg: str, key: bytes | None = None, path: str = index, what: str = "corrupt index"):
        return EmaError(f"{what}: {msg}", path=path, tensor=None if key is None else _key_name(key))

    if not entries:
        return  # TensorFlow reports the missing header
    # as TensorFlow reads it: the first entry is the header (whatever its key),
    # every later one a tensor entry, which must parse; no key twice
    try:
        header = tensor_bundle_pb2.BundleHeaderProto.FromString(entries[0][1])
    except (DecodeError, ValueError, RuntimeError):
        return  # TensorFlow reports an unreadable header
    decoded = []
    for key, value in entries[1:]:
        try:
            decoded.append((key, tensor_bundle_pb2.BundleEntryProto.FromString(value)))
        except (DecodeError, ValueError, RuntimeError) as e:
            raise bad(f"unreadable entry ({e})", key) from None
    table = dict(decoded)
    if len(table) < len(decoded) or b"" in table and entries[0][0] == b"":
        # the variable maps keep one entry, lookups find another (with another dtype, shape...)
        seen: set[bytes] = {entries[0][0]}
        dup = next(k for k, _ in decoded if k in seen or seen.add(k))
        raise bad("the index holds this tensor twice", dup)

    def extents_of(sl) -> list[tuple[int, int]]:
        return [(ext.start, ext.length if ext.HasField("length") else -1) for ext in sl.extent]

    slice_keys = set()
    for key, e in decoded:
        for sl in e.slices:
            skey = _slice_key(key, extents_of(sl))
            if skey in slice_keys:
                raise bad(f"the slice {extents_of(sl)} is listed twice", key)
            slice_keys.add(skey)

    def numel(key: bytes, e) -> int:
        dims = [d.size for d in e.shape.dim]
        if len(dims) > 200:
            raise bad(f"{len(dims)} dimensions", key)
        n = 1
        for d in dims:
            n *= d
            if d < 0 or n >= 2**63:
                raise bad(f"invalid shape {dims}", key)
        return n

    data_size: dict[int, int] = {}
    for key, e in decoded:
        n = numel(key, e)
        if e.slices:
            continue  # a partitioned variable's data is in its slices, checked below
        if not 0 <= e.shard_id < max(header.num_shards, 0):
            raise bad(f"data shard {e.shard_id} of {header.num_shards}", key)
        if e.shard_id not in data_size:
            shard = f"{prefix}.data-{e.shard_id:05d}-of-{header.num_shards:05d}"
            try:
                data_size[e.shard_id] = os.path.getsize(shard)
            except OSError:
                raise EmaError("data file is missing", path=shard) from None
        if e.offset < 0 or e.size < 0:
            raise bad(f"stored at offset {e.offset}, {e.size} bytes", key)
        if e.offset + e.size > data_size[e.shard_id]:
            raise bad(f"its bytes {e.offset}..{e.offset + e.size} are beyond the end of the file "
                      f"({data_size[e.shard_id]} bytes)", key, what="truncated or corrupt data",
                      path=f"{prefix}.data-{e.shard_id:05d}-of-{header.num_shards:05d}")
        itemsize = _tf_itemsize(e.dtype)
        if (itemsize and e.size != n * itemsize) or (itemsize == 0 and e.size < n):
            raise bad(f"{e.size} bytes stored for {n} elements of dtype {e.dtype}", key)

    for key, full in decoded:
        if not full.slices:
            continue
        dims = [d.size for d in full.shape.dim]
        covered = 0
        for sl in full.slices:
            extents = extents_of(sl)
            if len(extents) != len(dims):
                raise bad(f"a slice of rank {len(extents)} of a rank-{len(dims)} partitioned variable", key)
            shape = []
            for (start, length), dim in zip(extents, dims):
                if start < 0 or (length != -1 and (length < 0 or start + length > dim)) or (length == -1 and start):
                    raise bad(f"slice {extents} outside the shape {dims}", key)
                shape.append(dim if length == -1 else length)
            stored = table.get(_slice_key(key, extents))
            if stored is None:
                raise bad(f"the stored slice {extents} of the partitioned variable is missing", key)
            sdims = [d.size for d in stored.shape.dim]
            if stored.dtype != full.dtype or sdims != shape or stored.slices:
                raise bad(f"the stored slice {extents} (dtype {stored.dtype}, shape {sdims}) does not match the "
                          f"partitioned variable (dtype {full.dtype}, slice shape {shape})", key)
            covered += numel(key, stored)
        if covered < numel(key, full):
            raise bad(f"its slices hold {covered} of its {numel(key, full)} elements", key)


# --------------------------------------------------------------------------- reading


class TFReader(Reader):
    format = NAME

    def __init__(self, source: Source):
        super().__init__(source)
        prefix = source.path
        self._lock = threading.Lock()
        self._meta_set: set[str] | None | bool = False  # False: not read yet
        self._colls: dict[str, set[str]] | None = None
        self._graph = False  # False: not read yet; None: no (readable) object graph
        self._graph_entries: dict = {}
        self._failed: tuple[str, str, str] | None = None  # the first failed read: (message, path, tensor)
        if not os.path.isfile(prefix + INDEX):
            raise EmaError("the checkpoint's .index file is missing", path=prefix + INDEX)
        self._data = self._check_data_files(prefix)
        tf = import_tf(prefix)
        _check_index(prefix)  # before TensorFlow: its reader aborts the process on some corrupt indexes
        try:
            self._r = tf.train.load_checkpoint(prefix)
            shapes = self._r.get_variable_to_shape_map()
            dts = self._r.get_variable_to_dtype_map()
        except Exception as e:
            raise EmaError(f"not a readable TensorFlow checkpoint index: {_tf_message(e)}",
                           path=prefix + INDEX) from None
        self._tensors: dict[str, TensorInfo] = {}
        for name in sorted(shapes):  # sorted: the bundle's own order, so reads are sequential
            dt = _tf_dtype_name(dts[name])
            if dt is None:
                raise EmaError(f"dtype {getattr(dts[name], 'name', dts[name])} is not supported", path=prefix,
                               tensor=name)
            self._tensors[name] = TensorInfo(name, dt, tuple(int(d) for d in shapes[name]))

    @staticmethod
    def _check_data_files(prefix: str) -> list[str]:
        files = data_files(prefix)
        if not files:
            raise EmaError(f"the checkpoint has no data file ({os.path.basename(prefix)}.data-00000-of-NNNNN is missing)",
                           path=prefix)
        counts = {int(_DATA_RE.match(os.path.basename(f)).group("count")) for f in files}
        have = {os.path.basename(f) for f in files}
        base = os.path.basename(prefix)
        for n in sorted(counts):
            want = [f"{base}.data-{i:05d}-of-{n:05d}" for i in range(n)]
            missing = [w for w in want if w not in have]
            if not missing:
                return [os.path.join(os.path.dirname(prefix), w) for w in want]
        raise EmaError("data file is missing", path=os.path.join(os.path.dirname(prefix), missing[0]))

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def read(self, name: str) -> np.ndarray:
        info = self._tensors[name]
        with self._lock:
            if self._failed is not None:
                # TensorFlow's BundleReader keeps a failed read's status and aborts the
                # whole process (a CHECK failure) on its next lookup: never call it again
                raise EmaError(*self._failed[:1], path=self._failed[1], tensor=self._failed[2])
            try:
                value = self._r.get_tensor(name)
            except MemoryError:
                raise
            except Exception as e:
                where = self._data[0] if len(self._data) == 1 else f"{self.path} (data files)"
                self._failed = (f"truncated or corrupt data: {_tf_message(e)}", where, name)
                raise EmaError(self._failed[0], path=where, tensor=name) from None
        if info.dtype == "string":
            arr = np.empty((), dtype=object)
            if isinstance(value, np.ndarray):
                arr = value.astype(object, copy=False)
            else:
                arr[()] = value
            return arr
        arr = np.asarray(value)
        want = dtypes.to_numpy(info.dtype)
        if arr.dtype != want:
            arr = arr.view(want) if arr.dtype.itemsize == want.itemsize else arr.astype(want)
        if arr.shape != info.shape:
            raise EmaError(f"read shape {list(arr.shape)}, the index says {list(info.shape)}", path=self.path,
                           tensor=name)
        return arr

    def step(self) -> int | None:
        """The object graph's step counter (see :meth:`tf_objgraph.ObjectGraph.step_keys`:
        whatever its key), else the first of :data:`STEP_KEYS` present."""
        graph = self.object_graph()
        keys = [*(graph.step_keys() if graph is not None else ()), *STEP_KEYS]
        for key in keys:
            info = self._tensors.get(key)
            if info is not None and info.numel == 1 and info.dtype.startswith(("int", "uint")):
                s = step_from_scalar(self.read(key))
                if s is not None:
                    return s
        return None

    @property
    def meta_file(self) -> str | None:
        m = self.path + META
        return m if os.path.isfile(m) else None

    def averaged_set(self) -> set[str] | None:
        """The ``.meta`` collections' names (see :func:`averaged_names`), or None."""
        if self._meta_set is False:
            self._meta_set = averaged_names(self.meta_file, self._tensors)
        return self._meta_set

    def meta_collections(self) -> dict[str, set[str]]:
        """The ``.meta``'s collections as sets (only when :meth:`averaged_set` uses them)."""
        if self._colls is None:
            self._colls = {}
            if self.averaged_set() is not None:
                self._colls = {k: set(v) for k, v in read_meta_collections(self.meta_file).items()}
        return self._colls

    def object_graph(self):
        """The parsed TF2 object graph (:class:`tf_objgraph.ObjectGraph`), or None
        for a name-based checkpoint.  An unreadable graph: a warning, and the name
        rules decide."""
        if self._graph is False:
            self._graph = None
            if OBJECT_GRAPH_KEY in self._tensors:
                from ema_cli.formats import tf_objgraph

                try:
                    raw = np.asarray(self.read(OBJECT_GRAPH_KEY), dtype=object)
                    if raw.shape != ():
                        raise tf_objgraph.GraphError(f"a tensor of shape {list(raw.shape)}, not a scalar")
                    graph = tf_objgraph.ObjectGraph(raw[()])
                    self._graph_entries = graph.classify()
                    self._graph = graph
                except tf_objgraph.GraphError as e:
                    warn(f"{self.path}: unreadable {OBJECT_GRAPH_KEY} ({e}): the name rules decide what is "
                         "averaged, and tf.train.Checkpoint.restore will fail on this checkpoint")
        return self._graph

    def role(self, info: TensorInfo) -> Role:
        """From the object graph (TF2), else the ``.meta`` collections (TF1), else
        the name rules; see the module docstring and :mod:`tf_objgraph`."""
        name = info.name
        if name == OBJECT_GRAPH_KEY:
            return Role(OTHER, "the TF2 object graph")
        is_float = dtypes.is_float(info.dtype)
        graph = self.object_graph()
        if graph is not None:
            from ema_cli.formats import tf_objgraph as og

            e = self._graph_entries.get(name)
            if e is not None:
                why = e.describe()
                if e.category in (og.SLOT, og.OPTIMIZER):
                    return Role(OPTIMIZER, why)
                if e.category == og.SAVE_COUNTER:
                    return Role(COUNTER, why)
                if e.category == og.ATTRIBUTE:
                    return Role(OTHER, why)
                if not is_float:
                    kind = COUNTER if og.is_counter_edge(e.path) else OTHER
                    return Role(kind, f"{why}, {info.dtype}")
                return Role(BUFFER if e.category == og.MODEL_BUFFER else PARAMETER, why)
            role = _name_rule_role(info)
            return Role(role.kind, role.why.replace("name rules", "name rules (not in the object graph)", 1))
        if self.averaged_set() is not None:
            colls = self.meta_collections()
            trainable = colls.get("trainable_variables", set())
            moving = colls.get("moving_average_variables", set())
            if not is_float:
                return Role(OTHER, f"{info.dtype}: not floating point")
            if name in trainable:
                return Role(PARAMETER, "meta collections: trainable_variables")
            if name in moving:
                return Role(BUFFER, "meta collections: moving_average_variables, not trainable")
            role = _name_rule_role(info)
            kind = role.kind if role.kind in (OPTIMIZER, COUNTER) else OTHER
            return Role(kind, "meta collections: in neither")
        return _name_rule_role(info)

    def extras(self):
        graph = self.object_graph()
        chosen = self.averaged_set() if self.meta_file and graph is None else None
        return {
            "files": list(self.source.files),
            "object_based": OBJECT_GRAPH_KEY in self._tensors,
            "meta": self.meta_file,
            "averaged_from": ("object graph" if graph is not None
                              else "meta collections" if chosen is not None else "name rules"),
        }

    def close(self) -> None:
        self._r = None


Reader = TFReader


# --------------------------------------------------------------------------- rename


def rename_overrides(reader: TFReader, mapping: dict[str, str]) -> dict[str, np.ndarray]:
    """For ``rename`` ({input name: output name}, tensors absent are dropped): the
    values that must change with the names.  An object-based checkpoint's graph
    points each variable at its ``checkpoint_key``; the rewritten graph
    (:func:`tf_objgraph.rename_keys`) points at the new keys, so
    ``tf.train.Checkpoint.restore`` of the output finds the renamed values
    (``--to-original``: the shadow values, under the keys the graph already
    names).  A name-based (TF1) checkpoint: nothing."""
    if OBJECT_GRAPH_KEY not in reader.tensors() or OBJECT_GRAPH_KEY not in mapping:
        return {}
    from ema_cli.formats import tf_objgraph

    raw = np.asarray(reader.read(OBJECT_GRAPH_KEY), dtype=object)
    try:
        if raw.shape != ():
            raise tf_objgraph.GraphError(f"it is a tensor of shape {list(raw.shape)}, not a scalar")
        new = tf_objgraph.rename_keys(raw[()], mapping, mapping.values())
    except tf_objgraph.GraphError as e:
        raise EmaError(f"cannot rewrite the object graph for the new names: {e}", path=reader.path,
                       tensor=OBJECT_GRAPH_KEY) from None
    out = np.empty((), dtype=object)
    out[()] = new
    return {OBJECT_GRAPH_KEY: out}


# --------------------------------------------------------------------------- writing

BATCH_BYTES = 256 << 20  # per SaveV2 call; EMA_AVG_TF_BATCH_BYTES overrides (tests)
RESERVE_MARGIN = 1 << 20  # index, string tensors, file system slack


def validate_names(names, *, path: str | None = None) -> None:
    """Refuse tensor names a TensorFlow checkpoint cannot hold, before any work:
    ``""`` is the bundle's header key (TensorFlow aborts the process on it), a
    name starting with NUL would read as a partitioned variable's slice key, and a
    name must be valid UTF-8 (no lone surrogates).  ``path``: the output, for the
    message.  The engine can call it at plan time with the planned output names."""
    for name in names:
        if name == "":
            raise EmaError("a tensor with an empty name cannot be stored in a TensorFlow checkpoint (the empty key "
                           "is the bundle's header); rename it", path=path, tensor=name)
        if name.startswith("\x00"):
            raise EmaError("a tensor name starting with NUL cannot be stored in a TensorFlow checkpoint "
                           "(such keys are partitioned-variable slices)", path=path, tensor=name)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise EmaError("the tensor name is not valid Unicode (a lone surrogate): a TensorFlow checkpoint "
                           "cannot hold it", path=path, tensor=name.encode("utf-8", "backslashreplace").decode())


def _final_of(path: str) -> str:
    """The output a writer's staging path becomes (for messages)."""
    path = os.path.abspath(path)
    if path in _FINAL_OF:
        return _FINAL_OF[path]
    stage = os.path.dirname(path)
    m = _STAGING_RE.match(os.path.basename(stage))
    if m:  # a directory output staged as a whole (-o DIR/)
        return os.path.join(os.path.dirname(stage), m.group("base"), os.path.basename(path))
    return path


class TFWriter(Writer):
    """Writes the checkpoint prefix ``path``: ``.index`` and ``.data-*`` files.

    ``write`` converts each array to a tensor of exactly its planned dtype and
    buffers it; a full batch is saved with SaveV2 to a temporary prefix in a
    hidden directory beside ``path``; ``close`` merges the batches into
    ``path`` with MergeV2Checkpoints (one data file per batch) and copies the
    newest input's ``.meta`` when the dtypes are unchanged.  ``metadata`` is
    not stored: a TF checkpoint has no place for free-form metadata that every
    loader would ignore."""

    def __init__(self, path: str, shards: list[list[TensorInfo]], metadata: dict[str, str], template=None):
        self.path = path
        self.final = _final_of(path)
        self.infos = {i.name: i for shard in shards for i in shard}
        validate_names(self.infos, path=self.final)
        self.tf = import_tf(self.final)
        self._pending = set(self.infos)
        self._batch: list[tuple[str, object]] = []
        self._batch_bytes = 0
        self._parts: list[str] = []
        self._lock = threading.Lock()
        self.batch_bytes = int(os.environ.get("EMA_AVG_TF_BATCH_BYTES", BATCH_BYTES))
        parent, base = os.path.split(os.path.abspath(path))
        self._parts_dir = os.path.join(parent, f".{base}.parts-{os.getpid()}-{id(self):x}")
        os.makedirs(self._parts_dir)
        self._reserve_fd = -1
        try:
            self._reserved = self._reserve(sum(i.nbytes for i in self.infos.values() if i.dtype != "string")
                                           + RESERVE_MARGIN)
            self._meta_src = self._meta_to_copy(template)
        except BaseException:
            self.abort()
            raise

    def _reserve(self, size: int) -> int:
        """Space for the whole output, taken before any work (``posix_fallocate``
        of a file in the staging directory) and handed back batch by batch just
        before SaveV2 writes it: a full disk fails here, not after the compute."""
        f = os.path.join(self._parts_dir, "space-reservation")
        try:
            self._reserve_fd = os.open(f, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._reserve_fd, 0, size)
            else:  # pragma: no cover (not Linux)
                os.ftruncate(self._reserve_fd, size)
        except OSError as e:
            raise EmaError(f"not enough space for the output ({size} bytes needed): {e.strerror}",
                           path=self.final) from None
        return size

    def _unreserve(self, nbytes: int | None = None) -> None:
        """Hand back ``nbytes`` of the reservation (all of it: None)."""
        if self._reserve_fd < 0:
            return
        self._reserved = 0 if nbytes is None else max(0, self._reserved - nbytes)
        with contextlib.suppress(OSError):
            os.ftruncate(self._reserve_fd, self._reserved)
        if self._reserved == 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1

    def _error(self, e: BaseException) -> EmaError:
        """A TensorFlow write error, naming the output rather than the staging paths."""
        msg = _tf_message(e)
        staging = os.path.dirname(os.path.abspath(self.path))
        msg = re.sub(re.escape(staging) + r"[^\s:,;'\"]*", self.final, msg)
        return EmaError(f"cannot write: {msg}", path=self.final)

    def _meta_to_copy(self, template) -> str | None:
        if template is None or getattr(template, "format", None) != NAME:
            return None
        meta = getattr(template, "meta_file", None)
        if not meta:
            return None
        have = template.tensors()
        for name, info in self.infos.items():
            src = have.get(name)
            if src is not None and src.dtype != info.dtype:
                warn(f"{meta}: not copied to the output: the graph's variables are {src.dtype} "
                     f"but {name!r} is written as {info.dtype}")
                return None
        return meta

    def write(self, name: str, array: np.ndarray) -> None:
        tf = self.tf
        info = self.infos[name]
        if info.dtype == "string":
            arr = np.asarray(array, dtype=object)
            tdt = tf.string
            nbytes = sum(len(b) for b in arr.reshape(-1)) + 1
        else:
            arr = np.asarray(array, dtype=dtypes.to_numpy(info.dtype))
            tdt = tf.as_dtype(info.dtype)
            nbytes = max(info.nbytes, 1)
        if arr.shape != info.shape:
            raise EmaError(f"internal: shape {arr.shape} != {info.shape}", tensor=name)
        try:
            t = tf.constant(arr, dtype=tdt)
        except Exception as e:
            raise EmaError(f"cannot convert to a TensorFlow tensor: {_tf_message(e)}", tensor=name) from None
        del arr  # the tensor holds its own copy: only the batch counts against memory
        with self._lock:
            if name not in self._pending:
                raise EmaError("internal: tensor written twice or not planned", tensor=name)
            self._pending.discard(name)
            self._batch.append((name, t))
            self._batch_bytes += nbytes
            if self._batch_bytes >= self.batch_bytes:
                self._flush()

    def _flush(self) -> None:
        """Save the buffered batch to a new temporary prefix (caller holds the lock)."""
        if not self._batch:
            return
        tf = self.tf
        part = os.path.join(self._parts_dir, f"part-{len(self._parts):05d}")
        names = [n for n, _ in self._batch]
        tensors = [t for _, t in self._batch]
        self._unreserve(self._batch_bytes)
        try:
            tf.raw_ops.SaveV2(prefix=part, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
        except Exception as e:
            raise self._error(e) from None
        self._parts.append(part)
        self._batch, self._batch_bytes = [], 0

    def close(self) -> None:
        with self._lock:
            if self._pending:
                raise EmaError(f"internal: {len(self._pending)} tensors never written", path=self.path)
            self._flush()
            if not self._parts:
                raise EmaError("nothing to write: a TensorFlow checkpoint needs at least one tensor", path=self.final)
            self._unreserve()
            try:
                self.tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=self._parts, destination_prefix=self.path,
                                                   delete_old_dirs=True)
            except Exception as e:
                raise self._error(e) from None
            shutil.rmtree(self._parts_dir, ignore_errors=True)
            if self._meta_src:
                try:
                    shutil.copyfile(self._meta_src, self.path + META)
                except OSError as e:
                    raise EmaError(f"cannot copy the .meta graph: {e.strerror}", path=self._meta_src) from None

    def abort(self) -> None:
        with self._lock:
            self._batch = []
            self._unreserve()
            shutil.rmtree(self._parts_dir, ignore_errors=True)


Writer = TFWriter


# --------------------------------------------------------------------------- staging

LOCK_SUFFIX = ".ema-avg.lock"
JOURNAL_SUFFIX = ".ema-avg-journal.json"
_STAGING_RE = re.compile(r"^\.(?P<base>.+)\.ema-avg-(?P<pid>\d+)-[0-9a-f]+\.tmp(\.old)?$")
#: staging path -> the output prefix it will become (error messages name the output)
_FINAL_OF: dict[str, str] = {}


def _output_files(prefix: str) -> list[str]:
    """Existing files of a checkpoint prefix."""
    found = [prefix + s for s in (INDEX, META) if os.path.lexists(prefix + s)]
    return found + data_files(prefix)


def _index_shards(index: str) -> int | None:
    """``num_shards`` from an index's header entry, or None if unreadable."""
    try:
        with open(index, "rb") as fh:
            entries = _table_entries(fh.read())
    except (OSError, EmaError, CompressedIndex):
        return None
    if not entries:
        return None
    # BundleHeaderProto field 1 (num_shards, varint): parsed by hand, no TensorFlow needed
    hdr = entries[0][1]
    try:
        i = 0
        while i < len(hdr):
            tag, i = _varint(hdr, i)
            if tag == 0x08:
                n, _ = _varint(hdr, i)
                return n
            if tag & 7 == 0:
                _, i = _varint(hdr, i)
            elif tag & 7 == 2:
                ln, i = _varint(hdr, i)
                i += ln
            else:
                return None
        return 1  # proto3 default 0 is never written by TensorFlow; 1 shard
    except IndexError:
        return None


def _live_files(prefix: str) -> tuple[list[str], list[str]]:
    """(files of the checkpoint the ``.index`` describes, other data files of
    the prefix): the index, the ``.meta`` and the data files of its shard count."""
    index = prefix + INDEX
    datas = data_files(prefix)
    if not os.path.lexists(index):
        return ([prefix + META] if os.path.lexists(prefix + META) else []), datas
    n = _index_shards(index)
    live = [index] + ([prefix + META] if os.path.lexists(prefix + META) else [])
    if n is None:
        return live + datas, []
    want = {f"{prefix}.data-{i:05d}-of-{n:05d}" for i in range(n)}
    return live + [f for f in datas if f in want], [f for f in datas if f not in want]


_HELD: set[str] = set()  # lock files this process holds


class _Lock:
    """``fcntl.flock`` on ``DIR/.NAME.ema-avg.lock``: serialises the ema-avg runs
    writing one output.  The file is removed by its holder on release; a waiter
    that then holds a lock on the removed file retries on the new one."""

    def __init__(self, final: str):
        import fcntl

        parent, base = os.path.split(final)
        self.path = os.path.join(parent, f".{base}{LOCK_SUFFIX}")
        self.fd = -1
        if self.path in _HELD:  # flock would wait for this very process
            raise EmaError("this output is already being written by this run (given twice?)", path=final)
        waited = False
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise EmaError(f"cannot create the output's lock file: {e.strerror}", path=self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    warn(f"{final}: another ema-avg run is writing this output; waiting for it to finish")
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                _HELD.add(self.path)
                return
            os.close(fd)  # the holder removed the file while we waited: lock the new one

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        _HELD.discard(self.path)


def _journal_path(final: str) -> str:
    parent, base = os.path.split(final)
    return os.path.join(parent, f".{base}{JOURNAL_SUFFIX}")


def _read_journal(path: str) -> set[str] | None:
    import json

    try:
        with open(path) as fh:
            doc = json.load(fh)
        files = doc["files"]
        if isinstance(files, list) and all(isinstance(f, str) and "/" not in f for f in files):
            return set(files)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _recover(final: str) -> None:
    """Under the lock: the leftovers of an ema-avg run killed while committing
    this output (its journal names every file it may have put there) and the
    staging directories of dead runs are removed, with a warning.  A journal
    means the run died: a live one would hold the lock."""
    parent, base = os.path.split(final)
    journal = _journal_path(final)
    if os.path.lexists(journal):
        listed = _read_journal(journal)
        removed = []
        if listed is not None and not os.path.lexists(final + INDEX):
            for name in sorted(listed):  # the index is gone: no file of the prefix is live
                f = os.path.join(parent, name)
                if _prefix_of(name) == base and os.path.isfile(f) and not os.path.islink(f):
                    try:
                        os.unlink(f)
                        removed.append(name)
                    except OSError:
                        pass
        elif listed is not None:  # killed after the index was in place: the new checkpoint is complete
            _live, extra = _live_files(final)
            for f in extra:
                if os.path.basename(f) in listed:
                    try:
                        os.unlink(f)
                        removed.append(os.path.basename(f))
                    except OSError:
                        pass
        try:
            os.unlink(journal)
        except OSError:
            pass
        _fsync_dir(parent)
        what = f": {', '.join(removed)}" if removed else ""
        warn(f"{final}: an ema-avg run writing this output was killed; removed its leftovers{what}")
    try:
        names = os.listdir(parent)
    except OSError:
        return
    from ema_cli.output import _pid_alive

    for name in names:
        m = _STAGING_RE.match(name)
        if not m or m.group("base") != base:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
        warn(f"removed the staging leftovers of a killed ema-avg run (pid {pid}): {path}")


class TFStaging:
    """A TF output is several files, staged in a hidden directory beside the
    target and committed so that at every instant the prefix holds, for a
    TensorFlow reader (which finds a checkpoint by its ``.index`` and reads the
    data files that index names): nothing, the complete previous checkpoint, or
    the complete new one.  Never an index over data files of another checkpoint.

    ``commit``, holding the output's lock (taken before any check, so concurrent
    ema-avg runs writing one output take turns; each completes):

    1. a journal ``.NAME.ema-avg-journal.json`` listing every file of the prefix
       this commit may create or remove is put in place (fsync'ed);
    2. ``--force``: the old ``.index`` is removed (the old checkpoint is now
       invisible), then the old data files and ``.meta``;
    3. the new data files and ``.meta`` are linked in, then the new ``.index``
       last (``link``: it never replaces an index that appeared meanwhile);
    4. the journal is removed, then the ``checkpoint`` state file is written.

    A run killed in between leaves the old checkpoint, nothing, or the new one;
    the next run writing the output finds the journal and removes the files it
    lists that no index makes live (with a warning), and the staging directories
    of dead runs.  Data files or a ``.meta`` of the prefix with no ``.index``
    and no journal were not provably written by ema-avg: refused, never deleted,
    even with ``--force``.

    The ``checkpoint`` state file: see :meth:`_state_decision`."""

    def __init__(self, output: str, *, force: bool):
        self.final = os.path.abspath(output)
        if os.path.isdir(self.final):
            raise EmaError("output is a directory; a TensorFlow output is a checkpoint prefix such as DIR/model.ckpt",
                           path=output)
        parent, base = os.path.split(self.final)
        check_target(self.final + INDEX, force=True, is_dir=False)  # the directory; existence below, locked
        self._lock = _Lock(self.final)
        self.done = False
        self._moved: list[str] = []
        self._staged = None
        try:
            _recover(self.final)
            live, orphans = _live_files(self.final)
            if not os.path.lexists(self.final + INDEX) and (orphans or live):
                shown = ", ".join(os.path.basename(f) for f in (orphans + live)[:4])
                raise EmaError(f"files of an incomplete checkpoint (no {base}{INDEX}) that ema-avg did not provably "
                               f"write are at the output ({shown}); ema-avg never deletes them, even with --force: "
                               "move them away or choose another output", path=self.final)
            if orphans:
                shown = ", ".join(os.path.basename(f) for f in orphans[:4])
                raise EmaError(f"data files that its {base}{INDEX} does not name are beside the output ({shown}); "
                               "ema-avg never deletes them, even with --force: move them away", path=self.final)
            if live and not force:
                raise EmaError("output exists (use --force to overwrite)", path=live[0])
            self.state_action = self._state_decision(parent, force)
            self.force = force
            self._staged = Staged(self.final, is_dir=True)
        except BaseException:
            self._lock.release()
            raise
        self.path = os.path.join(self._staged.path, base)
        _FINAL_OF[self.path] = self.final
        self.final_files: list[str] = []

    def _state_decision(self, parent: str, force: bool) -> str:
        """What to do with ``DIR/checkpoint``: ``"write"`` (none, or one naming
        only this output), ``"keep"`` (it names other live checkpoints, a training
        directory: left as it is, with a warning at commit), ``"replace"``
        (anything else, with ``--force``).  Without ``--force``, a state file
        naming only deleted checkpoints, or unreadable, is refused: another
        tool's file."""
        state = os.path.join(parent, STATE_FILE)
        if not os.path.lexists(state):
            return "write"
        try:
            named = [os.path.abspath(p) for p in read_state_file(Path(state))]
        except EmaError:
            named = None
        if named and all(p == self.final for p in named):
            return "write"
        if named and any(p != self.final and os.path.isfile(p + INDEX) for p in named):
            return "keep"
        if force:
            return "replace"
        what = ("names only checkpoints that no longer exist" if named
                else "names no checkpoint" if named is not None else "is unreadable")
        raise EmaError(f"a checkpoint state file is in the output directory and {what}: replacing it needs --force",
                       path=state)

    def commit(self) -> None:
        try:
            self._commit()
        except FileExistsError as e:
            raise EmaError("output appeared while writing it (use --force to overwrite)", path=e.filename) from None
        except OSError as e:
            raise EmaError(f"cannot move the output into place: {e.strerror}", path=e.filename or self.final) from None

    def _commit(self) -> None:
        import json

        d = self._staged.path
        parent, base = os.path.split(self.final)
        names = [f for f in os.listdir(d) if f.startswith(base)]
        data = sorted(f for f in names if _DATA_RE.match(f) and _DATA_RE.match(f).group("prefix") == base)
        if base + INDEX not in names:
            raise EmaError("internal: the writer wrote no .index", path=self.final)
        new = data + ([base + META] if base + META in names else [])
        for f in new + [base + INDEX]:
            fsync_file(os.path.join(d, f))
        live, orphans = _live_files(self.final)
        if orphans or (live and not self.force):  # appeared since the checks (not an ema-avg run: it would wait)
            raise FileExistsError((orphans or live)[0])
        old = [f for f in live if f != self.final + INDEX]
        journal = _journal_path(self.final)
        tmp = os.path.join(d, "journal")
        with open(tmp, "w") as fh:
            json.dump({"tool": "ema-avg", "pid": os.getpid(), "note": "files of this prefix an ema-avg commit may "
                       "have left; the next run writing it removes those no index names",
                       "files": sorted({os.path.basename(f) for f in old} | set(new) | {base + INDEX})}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, journal)
        _fsync_dir(parent)
        if os.path.lexists(self.final + INDEX):  # --force: the old checkpoint disappears with its index
            os.unlink(self.final + INDEX)
            _fsync_dir(parent)
        for f in old:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        for f in new + [base + INDEX]:  # the index last: it makes the checkpoint visible
            dst = os.path.join(parent, f)
            if f == base + INDEX:
                _fsync_dir(parent)
            os.link(os.path.join(d, f), dst)
            self._moved.append(dst)
        _fsync_dir(parent)
        self.done = True  # the new checkpoint is complete: nothing below undoes it
        os.unlink(journal)
        self.final_files = list(self._moved)
        state = self._write_state_file(parent, base)
        if state:
            self.final_files.append(state)
        _fsync_dir(parent)
        self._release()

    def _write_state_file(self, parent: str, base: str) -> str | None:
        state = os.path.join(parent, STATE_FILE)
        if self.state_action == "keep":
            try:
                others = [p for p in read_state_file(Path(state))
                          if os.path.abspath(p) != self.final and os.path.isfile(p + INDEX)]
            except EmaError:
                others = []
            if others:
                warn(f"{state} left as it is (it names {os.path.basename(others[-1])}): "
                     f"tf.train.latest_checkpoint will not pick {self.final}")
                return None
        tmp = os.path.join(self._staged.path, STATE_FILE)
        quoted = base.replace("\\", "\\\\").replace('"', '\\"')
        with open(tmp, "w") as fh:
            fh.write(f'model_checkpoint_path: "{quoted}"\nall_model_checkpoint_paths: "{quoted}"\n')
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, state)
        return state

    def _release(self) -> None:
        if self._staged is not None:
            shutil.rmtree(self._staged.path, ignore_errors=True)
            _FINAL_OF.pop(getattr(self, "path", ""), None)
        self._lock.release()

    def discard(self) -> None:
        if self.done:
            self._release()
            return
        # a commit that failed half way on an OSError (a kill leaves this to _recover):
        # with the old index gone, every file the journal lists is ours and not live
        for f in self._moved:  # new files linked in before the failure (never an existing name)
            with contextlib.suppress(OSError):
                os.unlink(f)
        journal = _journal_path(self.final)
        if self._staged is not None and os.path.lexists(journal) and not os.path.lexists(self.final + INDEX):
            parent = os.path.dirname(self.final)
            for name in _read_journal(journal) or ():
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(parent, name))
            with contextlib.suppress(OSError):
                os.unlink(journal)
        elif self._staged is not None and os.path.lexists(journal):
            with contextlib.suppress(OSError):  # the old checkpoint is untouched
                os.unlink(journal)
        if self._staged is not None:
            self._staged.discard()
        _FINAL_OF.pop(getattr(self, "path", ""), None)
        self._lock.release()


def write_state_file(directory: str, base: str) -> None:
    """The ``checkpoint`` state file naming prefix ``base`` (relative), for a
    directory output staged as a whole (``-o DIR/``): the directory is new, so
    there is no training state file to respect."""
    quoted = base.replace("\\", "\\\\").replace('"', '\\"')
    with open(os.path.join(directory, STATE_FILE), "w") as fh:
        fh.write(f'model_checkpoint_path: "{quoted}"\nall_model_checkpoint_paths: "{quoted}"\n')


def make_staging(output: str, *, sharded: bool, force: bool) -> TFStaging:
    """``sharded`` (``--max-shard-size``) needs nothing special: TF data files are
    already split into batches.  TensorFlow is imported first, so its absence is
    reported against the output path before anything is created."""
    import_tf(output)
    return TFStaging(output, force=force)
