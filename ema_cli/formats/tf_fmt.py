"""TensorFlow checkpoints (TF1 name-based and TF2 object-based, V2 bundle format).

A checkpoint is a *prefix* (``run/model.ckpt-1200``) with an ``.index`` file,
one or more ``.data-NNNNN-of-MMMMM`` files and, for TF1 Savers, a ``.meta``
graph.  Discovery (``claim_path``, ``scan_dir``) only looks at file names.

Nothing here imports TensorFlow: the bundle is read and written by
:mod:`ema_cli.formats.tf_bundle` (the LevelDB-format ``.index`` and its
protobuf records decoded by hand, data files memory-mapped, CRC32C checked
with ``crc32c``), the TF2 object graph by :mod:`tf_objgraph` and the TF1
``.meta`` collections by :func:`read_meta_collections`, both from the protobuf
wire format.  The reader returns zero-copy views (partitioned variables
assembled from their slices); the writer streams tensors range by range into
the data files and writes the index last.  Every dtype is kept and every
string tensor (the TF2 object graph, Keras config JSON) copied byte for byte,
so ``tf.train.Checkpoint.restore`` and ``Saver.restore`` accept the result.
:func:`import_tf` (TensorFlow with its logging silenced) is kept for callers
that want TensorFlow itself (the tests' oracles).

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
from ema_cli.formats import tf_bundle
from ema_cli.formats.base import (BUFFER, COUNTER, OPTIMIZER, OTHER, PARAMETER, Format, Reader, Role, Source, TensorInfo,
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


def _variable_key(vdef: bytes) -> str:
    """The checkpoint key a TF1 ``VariableDef`` (serialized) is saved under: its
    ``save_slice_info_def.full_name`` for a partitioned variable, else its
    ``variable_name`` without the ``:0``."""
    name = full = ""
    for num, wt, v in tf_bundle.fields(vdef):
        if num == 1 and wt == 2:
            name = bytes(v).decode("utf-8", "surrogateescape")
        elif num == 4 and wt == 2:
            for n2, w2, v2 in tf_bundle.fields(v):
                if n2 == 1 and w2 == 2:
                    full = bytes(v2).decode("utf-8", "surrogateescape")
    if full:
        return full
    return name[: name.rindex(":")] if ":" in name else name


def _collection_names(coll: bytes) -> list[str]:
    """A ``CollectionDef``'s checkpoint keys: ``node_list`` (1) tensor names,
    ``bytes_list`` (2) serialized VariableDefs; other kinds hold none."""
    kind, payload = None, b""
    for num, wt, v in tf_bundle.fields(coll):
        if wt == 2 and num in (1, 2, 3, 4, 5):
            kind, payload = num, v  # a oneof: the last one set wins
    if kind not in (1, 2):
        return []
    values = [v for num, wt, v in tf_bundle.fields(payload) if num == 1 and wt == 2]
    if kind == 1:
        return [bytes(v).decode("utf-8", "surrogateescape").rsplit(":", 1)[0] for v in values]
    return [_variable_key(v) for v in values]


def read_meta_collections(meta_file: str) -> dict[str, list[str]]:
    """The checkpoint keys in a TF1 ``.meta``'s ``trainable_variables`` and
    ``moving_average_variables`` collections (missing collections: absent keys).

    Read from the protobuf wire format without TensorFlow: ``MetaGraphDef``
    field 4 is ``collection_def`` (a map: entries of key 1, ``CollectionDef``
    2), as in ``tensorflow/core/protobuf/meta_graph.proto``.
    Reused by the TF ``variables_to_restore`` name map."""
    try:
        with open(meta_file, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise EmaError(f"cannot read the .meta graph: {e.strerror}", path=meta_file) from None
    wanted = ("trainable_variables", "moving_average_variables")
    colls: dict[str, bytes] = {}
    try:
        for num, wt, v in tf_bundle.fields(raw):
            if num == 4:
                if wt != 2:
                    raise tf_bundle.WireError("collection_def: wire type")
                key, value = "", b""
                for n2, w2, v2 in tf_bundle.fields(v):
                    if n2 == 1 and w2 == 2:
                        key = bytes(v2).decode("utf-8", "surrogateescape")
                    elif n2 == 2 and w2 == 2:
                        value = v2
                if key in wanted:
                    colls[key] = value  # a map: the last entry of a key wins
    except tf_bundle.WireError as e:
        raise EmaError(f"unreadable .meta graph (not a MetaGraphDef: {e}); move it away to use the name rules",
                       path=meta_file) from None
    out: dict[str, list[str]] = {}
    for key in wanted:
        if key not in colls:
            continue
        try:
            names = _collection_names(colls[key])
        except tf_bundle.WireError as e:
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
# The bundle is parsed by ema_cli.formats.tf_bundle (no TensorFlow): every block
# checksum of the .index, every entry, and what TensorFlow's own reader would
# CHECK (abort the process on) or trust (a shape much larger than the data) are
# checked when a reader opens it.

CompressedIndex = tf_bundle.CompressedIndex
SNAPPY_HINT = tf_bundle.SNAPPY_HINT


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
        if not os.path.isfile(prefix + INDEX):
            raise EmaError("the checkpoint's .index file is missing", path=prefix + INDEX)
        self._data = self._check_data_files(prefix)
        self._r = tf_bundle.Bundle(prefix)
        self._tensors: dict[str, TensorInfo] = {}
        for name in sorted(self._r.tensors):  # sorted: the bundle's own order, so reads are sequential
            dt, shape = self._r.tensors[name]
            self._tensors[name] = TensorInfo(name, dt, shape)

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
        """The tensor's values: a read-only view of the mapped data file (its
        crc32c checked on the first read), an object array of bytes for strings,
        a partitioned variable assembled from its slices."""
        if self._r is None:
            raise EmaError("internal: read after close", path=self.path, tensor=name)
        return self._r.read(name)

    def read_stream(self, name: str):
        """The tensor as a flat array for the kernel, its crc32c checked just
        ahead of the reads (``tf_bundle.Bundle.read_stream``)."""
        if self._r is None:
            raise EmaError("internal: read after close", path=self.path, tensor=name)
        return self._r.read_stream(name)

    def prefetch(self, name: str, first: int = 0, last: int | None = None) -> bool:
        """The tensor's elements ``[first, last)`` will be read soon (``tf_bundle.Bundle.prefetch``)."""
        return self._r is not None and self._r.prefetch(name, first, last)

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """Done with the tensor or its elements ``[first, last)``: its mapped pages
        leave the process (see ``tf_bundle.Bundle.release``)."""
        if self._r is not None:
            self._r.release(name, first, last)

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
        if self._r is not None:
            self._r.close()
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
    """Writes the checkpoint prefix ``path``: ``.index`` and ``.data-*`` files,
    without TensorFlow (:class:`tf_bundle.BundleWriter`).

    Every tensor's place in the data files is fixed when the writer is made
    (key order; one data file per output shard, or per ``EMA_AVG_TF_BATCH_BYTES``
    of tensor data when that is set: tests use it to get many data files), and
    the files' space is reserved then.  ``write`` and ``write_range`` put the
    bytes at their place as they arrive (the engine streams large tensors range
    by range: memory does not grow with the largest tensor), each tensor's
    crc32c computed as its ranges go by; ``close`` appends the string tensors
    (the TF2 object graph, Keras config JSON: copied byte for byte) and writes
    the ``.index``, then copies the newest input's ``.meta`` when the dtypes are
    unchanged.  Every dtype is kept, so ``tf.train.Checkpoint.restore`` and
    ``Saver.restore`` accept the result.  ``metadata`` is not stored: a TF
    checkpoint has no place for free-form metadata that every loader would
    ignore."""

    writes_ranges = True

    def __init__(self, path: str, shards: list[list[TensorInfo]], metadata: dict[str, str], template=None):
        self.path = path
        self.final = _final_of(path)
        self.infos = {i.name: i for shard in shards for i in shard}
        validate_names(self.infos, path=self.final)
        if not self.infos:
            raise EmaError("nothing to write: a TensorFlow checkpoint needs at least one tensor", path=self.final)
        for info in self.infos.values():
            if not can_store(info.dtype):
                raise EmaError(f"a TensorFlow checkpoint cannot store dtype {info.dtype}", path=self.final,
                               tensor=info.name)
        batch = os.environ.get("EMA_AVG_TF_BATCH_BYTES")
        files: list[list[tuple[str, str, tuple[int, ...]]]] = []
        for shard in shards:
            if not shard:
                continue
            current, size = [], 0
            for info in sorted(shard, key=lambda i: i.name.encode("utf-8")):
                current.append((info.name, info.dtype, info.shape))
                size += max(info.nbytes if info.dtype != "string" else 1, 1)
                if batch is not None and size >= int(batch):
                    files.append(current)
                    current, size = [], 0
            if current:
                files.append(current)
        self._w = tf_bundle.BundleWriter(path, files, self.final)
        try:
            need = self._w.data_bytes()
            try:
                self._w.reserve()
            except OSError as e:
                raise EmaError(f"not enough space for the output ({need + RESERVE_MARGIN} bytes needed): "
                               f"{e.strerror}", path=self.final) from None
            self._meta_src = self._meta_to_copy(template)
        except BaseException:
            self.abort()
            raise

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
        if name not in self.infos:
            raise EmaError("internal: tensor written twice or not planned", tensor=name)
        self._w.write(name, array)

    def write_range(self, name: str, start: int, flat: np.ndarray) -> None:
        """Elements ``[start, start + flat.size)`` of a numeric tensor (flat, its dtype)."""
        self._w.write_range(name, start, flat)

    def close(self) -> None:
        self._w.close()
        if self._meta_src:
            try:
                shutil.copyfile(self._meta_src, self.path + META)
            except OSError as e:
                raise EmaError(f"cannot copy the .meta graph: {e.strerror}", path=self._meta_src) from None

    def abort(self) -> None:
        self._w.abort()


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
            entries = tf_bundle.read_table(fh.read())
    except (OSError, EmaError, tf_bundle.TableError, CompressedIndex):
        return None
    if not entries or entries[0][0] != tf_bundle.HEADER_KEY:
        return None
    try:
        n = tf_bundle.decode_header(entries[0][1]).num_shards
    except tf_bundle.WireError:
        return None
    return n if n > 0 else None


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
    """``sharded`` (``--max-shard-size``): one data file per output shard, which
    the writer does; the staging needs nothing special."""
    return TFStaging(output, force=force)


class TFFormat(Format):
    name = NAME
    reader = TFReader
    writer = TFWriter

    claim_path = staticmethod(claim_path)
    scan_dir = staticmethod(scan_dir)
    is_output = staticmethod(is_output)
    can_store = staticmethod(can_store)
    make_staging = staticmethod(make_staging)

    def directory_name(self, shards, newest):
        return "model.ckpt"

    def finish_directory(self, stage, name):
        write_state_file(stage, name)


FORMAT = TFFormat()
