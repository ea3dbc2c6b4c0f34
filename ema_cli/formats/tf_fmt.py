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

Which tensors are averaged by default (:func:`averaged_names`): with a TF1
``.meta`` beside the checkpoint, exactly its ``trainable_variables`` and
``moving_average_variables`` collections (the set TensorFlow's
ExponentialMovingAverage maintains); otherwise every float tensor except
optimizer state, existing moving-average shadows and bookkeeping counters
(:func:`is_model_variable`).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np

from ema_cli import dtypes
from ema_cli.notices import warn
from ema_cli.errors import EmaError
from ema_cli.formats.base import Reader, Source, TensorInfo, Writer, step_from_scalar
from ema_cli.output import Staged, _fsync_dir, check_target

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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import tensorflow as tf
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


def claim_path(path: Path) -> list[Source] | None:
    """A prefix, any of a checkpoint's files, or a ``checkpoint`` state file."""
    p = str(path)
    if os.path.isfile(p + INDEX) and not p.endswith(INDEX):
        return [_source(p)]
    if os.path.isdir(p):
        return None
    if path.name == STATE_FILE and path.is_file():
        return _state_file_sources(path)
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


def _state_file_sources(path: Path) -> list[Source]:
    prefixes = read_state_file(path)
    if not prefixes:
        raise EmaError("not a TensorFlow checkpoint state file (it names no checkpoint)", path=str(path))
    return [_source(p) for p in prefixes if os.path.isfile(p + INDEX)]


# --------------------------------------------------------------------------- which tensors are averaged

_OPTIMIZER_SEGMENT = re.compile(
    r"^(Adam|AdamW|LazyAdam|Nadam|Adamax|AMSGrad|Momentum|RMSProp|RMSprop|Adagrad|AdagradDA|ProximalAdagrad|"
    r"Adadelta|Ftrl|LARS|LARSOptimizer|LAMB|Lamb|Lion|Adafactor|SGD)(_\d+)?$"
)
_OPTIMIZER_GLOBAL = re.compile(r"^beta[12]_power(_\d+)?$")
_BOOKKEEPING = frozenset({"global_step", "save_counter", "step"})


def is_model_variable(name: str) -> bool:
    """The name rules used when no ``.meta`` says which variables are trained.

    False for optimizer state (TF2 ``optimizer/...`` and ``.OPTIMIZER_SLOT``;
    TF1 slots ``*/Adam``, ``*/Adam_1``, ``*/Momentum``, ``*/RMSProp*``, Keras
    ``training/Adam/...``; ``beta1_power``/``beta2_power``), moving-average
    shadows (``*/ExponentialMovingAverage``, ``*/SWAMovingAverage``; the
    ``--suffix`` in use is handled by the engine), ``save_counter`` and
    ``global_step``."""
    head = name.partition("/.ATTRIBUTES/")[0]
    segs = head.split("/")
    if segs[0] == "optimizer" or ".OPTIMIZER_SLOT" in segs:
        return False
    if segs[-1] in _BOOKKEEPING and len(segs) == 1:
        return False
    if segs[-1] == "global_step":
        return False
    if any(_OPTIMIZER_SEGMENT.match(s) for s in segs) or _OPTIMIZER_GLOBAL.match(segs[-1]):
        return False
    if len(segs) > 1 and segs[-1].endswith("MovingAverage"):
        return False
    return True


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


# --------------------------------------------------------------------------- reading


class TFReader(Reader):
    format = NAME

    def __init__(self, source: Source):
        super().__init__(source)
        prefix = source.path
        self._lock = threading.Lock()
        self._meta_set: set[str] | None | bool = False  # False: not read yet
        if not os.path.isfile(prefix + INDEX):
            raise EmaError("the checkpoint's .index file is missing", path=prefix + INDEX)
        self._data = self._check_data_files(prefix)
        tf = import_tf(prefix)
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
        try:
            with self._lock:
                value = self._r.get_tensor(name)
        except MemoryError:
            raise
        except Exception as e:
            where = self._data[0] if len(self._data) == 1 else f"{self.path} (data files)"
            raise EmaError(f"truncated or corrupt data: {_tf_message(e)}", path=where, tensor=name) from None
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
        for key in STEP_KEYS:
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

    def averaged_by_default(self, info: TensorInfo) -> bool:
        if info.dtype not in dtypes.AVERAGED_BY_DEFAULT:
            return False
        chosen = self.averaged_set()
        if chosen is not None:
            return info.name in chosen
        return is_model_variable(info.name)

    def extras(self):
        chosen = self.averaged_set() if self.meta_file else None
        return {
            "files": list(self.source.files),
            "object_based": OBJECT_GRAPH_KEY in self._tensors,
            "meta": self.meta_file,
            "averaged_from": "meta collections" if chosen is not None else "name rules",
        }

    def close(self) -> None:
        self._r = None


Reader = TFReader


# --------------------------------------------------------------------------- writing

BATCH_BYTES = 256 << 20  # per SaveV2 call; EMA_AVG_TF_BATCH_BYTES overrides (tests)


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
        self.tf = import_tf(path)
        self.path = path
        self.infos = {i.name: i for shard in shards for i in shard}
        self._pending = set(self.infos)
        self._batch: list[tuple[str, object]] = []
        self._batch_bytes = 0
        self._parts: list[str] = []
        self._lock = threading.Lock()
        self.batch_bytes = int(os.environ.get("EMA_AVG_TF_BATCH_BYTES", BATCH_BYTES))
        parent, base = os.path.split(os.path.abspath(path))
        self._parts_dir = os.path.join(parent, f".{base}.parts-{os.getpid()}-{id(self):x}")
        os.makedirs(self._parts_dir)
        self._meta_src = self._meta_to_copy(template)

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
        try:
            tf.raw_ops.SaveV2(prefix=part, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
        except Exception as e:
            raise EmaError(f"cannot write: {_tf_message(e)}", path=self.path) from None
        self._parts.append(part)
        self._batch, self._batch_bytes = [], 0

    def close(self) -> None:
        with self._lock:
            if self._pending:
                raise EmaError(f"internal: {len(self._pending)} tensors never written", path=self.path)
            self._flush()
            if not self._parts:
                raise EmaError("nothing to write: a TensorFlow checkpoint needs at least one tensor", path=self.path)
            try:
                self.tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=self._parts, destination_prefix=self.path,
                                                   delete_old_dirs=True)
            except Exception as e:
                raise EmaError(f"cannot write: {_tf_message(e)}", path=self.path) from None
            shutil.rmtree(self._parts_dir, ignore_errors=True)
            if self._meta_src:
                try:
                    shutil.copyfile(self._meta_src, self.path + META)
                except OSError as e:
                    raise EmaError(f"cannot copy the .meta graph: {e.strerror}", path=self._meta_src) from None

    def abort(self) -> None:
        with self._lock:
            self._batch = []
            shutil.rmtree(self._parts_dir, ignore_errors=True)


Writer = TFWriter


# --------------------------------------------------------------------------- staging


def _output_files(prefix: str) -> list[str]:
    """Existing files of a checkpoint prefix."""
    found = [prefix + s for s in (INDEX, META) if os.path.lexists(prefix + s)]
    return found + data_files(prefix)


class TFStaging:
    """A TF output is several files: staged in a hidden directory beside the
    target, moved into place on ``commit`` (data files, ``.meta``, then
    ``.index`` last, so a reader never sees an index without its data), then
    the ``checkpoint`` state file, so ``tf.train.latest_checkpoint(dir)`` finds
    the output.  An existing state file that names other live checkpoints
    (writing into a training directory) is left alone, with a warning: training
    would otherwise resume from the average."""

    def __init__(self, output: str, *, force: bool):
        self.final = os.path.abspath(output)
        if os.path.isdir(self.final):
            raise EmaError("output is a directory; a TensorFlow output is a checkpoint prefix such as DIR/model.ckpt",
                           path=output)
        existing = _output_files(self.final)
        check_target(self.final + INDEX, force=force, is_dir=False)
        if existing and not force:
            raise EmaError("output exists (use --force to overwrite)", path=existing[0])
        self._stale = existing
        self.force = force
        self._staged = Staged(self.final, is_dir=True)
        self.path = os.path.join(self._staged.path, os.path.basename(self.final))
        self.final_files: list[str] = []
        self._moved: list[str] = []
        self.done = False

    def commit(self) -> None:
        try:
            self._commit()
        except FileExistsError as e:
            raise EmaError("output appeared while writing it (use --force to overwrite)", path=e.filename) from None
        except OSError as e:
            raise EmaError(f"cannot move the output into place: {e.strerror}", path=e.filename or self.final) from None

    def _commit(self) -> None:
        d = self._staged.path
        parent, base = os.path.split(self.final)
        names = [f for f in os.listdir(d) if f.startswith(base)]
        data = sorted(f for f in names if _DATA_RE.match(f))
        order = data + [f for f in names if f == base + META] + [f for f in names if f == base + INDEX]
        if base + INDEX not in order:
            raise EmaError("internal: the writer wrote no .index", path=self.final)
        for f in order:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for f in order:
            src, dst = os.path.join(d, f), os.path.join(parent, f)
            if self.force:
                os.replace(src, dst)
            else:  # never replaces a file that appeared meanwhile (a concurrent run)
                os.link(src, dst)
                os.unlink(src)
            self._moved.append(dst)
        for old in self._stale:  # --force: files of the old output that were not replaced
            if old not in self._moved:
                try:
                    os.unlink(old)
                except OSError:
                    pass
        self.final_files = list(self._moved)
        state = self._write_state_file(parent, base)
        if state:
            self.final_files.append(state)
        _fsync_dir(parent)
        self.done = True
        shutil.rmtree(d, ignore_errors=True)

    def _write_state_file(self, parent: str, base: str) -> str | None:
        state = os.path.join(parent, STATE_FILE)
        if os.path.exists(state):
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

    def discard(self) -> None:
        if self.done:
            return
        for f in self._moved:  # a commit that failed half way
            try:
                os.unlink(f)
            except OSError:
                pass
        self._staged.discard()


def make_staging(output: str, *, sharded: bool, force: bool) -> TFStaging:
    """``sharded`` (``--max-shard-size``) needs nothing special: TF data files are
    already split into batches.  TensorFlow is imported first, so its absence is
    reported against the output path before anything is created."""
    import_tf(output)
    return TFStaging(output, force=force)
