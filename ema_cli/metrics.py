"""``--metrics FILE --top-k K``: pick the K best checkpoints by a metric.

FILE is where a training tool wrote its metrics:

- a Hugging Face ``trainer_state.json`` (its ``log_history``, keyed by
  ``step``), or a checkpoint / run directory holding one (the one with the
  largest ``global_step`` has the whole history);
- TensorBoard event files (``events.out.tfevents.*``) or a directory of them
  (searched recursively): scalars by tag and step, TF1/Keras ``simple_value``
  and TF2 ``tf.summary.scalar`` tensors alike;
- a Keras ``CSVLogger`` CSV (first column ``epoch``, 0-based): row ``e`` is
  the checkpoint that ``ModelCheckpoint`` names with ``{epoch}`` = ``e + 1``;
- a plain CSV (first column, or a ``step`` column: the step or checkpoint
  name; one column per metric) or JSON (``{step_or_name: value}``,
  ``{step_or_name: {metric: value}}`` or a list of
  ``{"step"|"checkpoint": ..., metric: value}``).

``--metric NAME`` picks the column / key / tag; it is required when the file
holds more than one.  When a metric was logged more than once for the same
step, the last written value counts.  Anything that cannot be read is an
:class:`EmaError` naming the file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from ema_cli import schedule, steps
from ema_cli.errors import EmaError, UsageError

TB_HINT = "pip install 'ema-avg[tensorboard]'"
_INDEX_KEYS = ("step", "global_step", "checkpoint", "path", "name", "epoch")


@dataclass
class Metrics:
    """Every metric series found in a metrics file."""

    path: str
    kind: str  # "trainer_state", "tensorboard", "keras-csv", "csv", "json"
    by: str  # "step" (key: step or checkpoint name) or "epoch" (key: Keras' 1-based {epoch})
    series: dict[str, dict[str, float]] = field(default_factory=dict)
    # TensorBoard: series name -> bare tag (names carry the run directory when there are several runs)
    tags: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # the file actually read (a directory was given)
    text_columns: dict[str, str] = field(default_factory=dict)  # CSV columns left out: name -> why

    def choose(self, metric: str | None) -> tuple[str, dict[str, float]]:
        names = list(self.series)
        if not names:
            raise EmaError(f"no metric found in this {_KIND[self.kind]}", path=self.path)
        if metric is None:
            if len(names) == 1:
                return names[0], self.series[names[0]]
            raise UsageError(f"{self.path}: holds {len(names)} metrics, pick one with --metric: {_listing(names)}")
        if metric in self.series:
            return metric, self.series[metric]
        if metric in self.text_columns:
            raise EmaError(f"column {metric!r} is not numeric ({self.text_columns[metric]})", path=self.path)
        same_tag = [n for n, t in self.tags.items() if t == metric]
        if len(same_tag) == 1:
            return same_tag[0], self.series[same_tag[0]]
        if same_tag:
            raise UsageError(f"{self.path}: tag {metric!r} is logged by several runs, pick one with --metric: {_listing(same_tag)}")
        raise EmaError(f"no metric {metric!r} in this {_KIND[self.kind]} (it has: {_listing(names)})", path=self.path)


_KIND = {"trainer_state": "trainer_state.json", "tensorboard": "TensorBoard log", "keras-csv": "CSVLogger file",
         "csv": "CSV file", "json": "JSON file"}


def _listing(names: list[str], most: int = 30) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" ... ({len(names)} in all)" if len(names) > most else "")


# --------------------------------------------------------------------------- loading


def load(path: str) -> Metrics:
    """Read a metrics file or directory (see the module docstring)."""
    if os.path.isdir(path):
        return _load_dir(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EmaError(f"cannot read metrics: {e.strerror}", path=path) from None
    if not data.strip():
        raise EmaError("the metrics file is empty", path=path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" in text:
        text = None  # a TFRecord's first bytes (a little-endian length) hold NULs
    if "tfevents" in os.path.basename(path) or (text is None and _looks_like_records(data)):
        return _tensorboard(path, [path])
    if text is None:
        raise EmaError("not a metrics file (binary, and not a TensorBoard event file); expected CSV, JSON, "
                       "trainer_state.json or events.out.tfevents.*", path=path)
    if path.endswith(".json") or text.lstrip().startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise EmaError(f"cannot parse metrics: not valid JSON ({e})", path=path) from None
        if isinstance(doc, dict) and "log_history" in doc:
            return _trainer_state(path, doc)
        return _plain_json(path, doc)
    return _csv(path, text)


def _load_dir(path: str) -> Metrics:
    states = [os.path.join(path, "trainer_state.json")]
    try:
        states += [os.path.join(path, d, "trainer_state.json") for d in sorted(os.listdir(path))]
    except OSError as e:
        raise EmaError(f"cannot read metrics directory: {e.strerror}", path=path) from None
    states = [s for s in states if os.path.isfile(s)]
    if states:
        best, best_step = None, None
        for s in states:
            try:
                with open(s, encoding="utf-8") as f:
                    gs = json.load(f).get("global_step")
            except (OSError, ValueError, AttributeError):
                raise EmaError("cannot parse trainer_state.json", path=s) from None
            gs = gs if isinstance(gs, int) else -1
            if best_step is None or gs >= best_step:
                best, best_step = s, gs
        m = load(best)
        if m.kind != "trainer_state":
            raise EmaError("not a trainer_state.json (no log_history)", path=best)
        m.path, m.source = path, best
        return m
    events = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        events += [os.path.join(root, f) for f in sorted(files) if "tfevents" in f]
    if not events:
        raise EmaError("no trainer_state.json and no TensorBoard event file (events.out.tfevents.*) in this directory",
                       path=path)
    return _tensorboard(path, events)


def _num(v) -> float | None:
    """A metric value, or None for a missing one (empty, NA); NaN stays NaN."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = v.strip()
        if s in ("", "NA", "N/A", "None", "null"):
            return None
        return float(s)  # ValueError: not a number
    return None


def _key(v) -> str:
    """A step or checkpoint name as a lookup key (``1200``, ``1200.0`` -> ``"1200"``)."""
    if isinstance(v, bool):
        raise ValueError(f"not a step or checkpoint name: {v!r}")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    s = str(v).strip()
    if re.fullmatch(r"[+-]?\d+(\.0*)?", s):
        return str(int(float(s)))
    return s


def _trainer_state(path: str, doc: dict) -> Metrics:
    hist = doc.get("log_history")
    if not isinstance(hist, list):
        raise EmaError("log_history is not a list", path=path)
    m = Metrics(path, "trainer_state", "step")
    for entry in hist:  # in logging order: a later entry for the same step wins
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        for k, v in entry.items():
            if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            m.series.setdefault(k, {})[str(entry["step"])] = float(v)
    return m


def _plain_json(path: str, doc) -> Metrics:
    m = Metrics(path, "json", "step")
    try:
        if isinstance(doc, dict):
            for k, v in doc.items():
                if isinstance(v, dict):
                    for name, x in v.items():
                        val = _num(x)
                        if val is not None:
                            m.series.setdefault(str(name), {})[_key(k)] = val
                else:
                    val = _num(v)
                    if val is None:
                        raise ValueError(f"no number for {k!r}")
                    m.series.setdefault("value", {})[_key(k)] = val
        elif isinstance(doc, list):
            for row in doc:
                if not isinstance(row, dict):
                    raise ValueError(f"list entry {row!r} is not an object")
                idx = next((row[k] for k in ("step", "global_step", "checkpoint", "path", "name") if k in row), None)
                if idx is None:
                    raise ValueError(f"entry {row} has no 'step' or 'checkpoint'")
                for k, v in row.items():
                    if k in _INDEX_KEYS:
                        continue
                    val = _num(v) if isinstance(v, (int, float)) else None
                    if val is not None:
                        m.series.setdefault(k, {})[_key(idx)] = val
        else:
            raise ValueError("the document is neither an object nor a list")
    except (ValueError, TypeError) as e:
        raise EmaError(f"cannot parse metrics ({e}); expected {{step_or_name: value}} or a list of "
                       "{\"step\": ..., \"value\": ...}", path=path) from None
    return m


def _csv(path: str, text: str) -> Metrics:
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r) and not r[0].startswith("#")]
    if not rows:
        raise EmaError("no metrics in the file", path=path)
    if len(rows[0]) < 2:
        raise EmaError("cannot parse metrics: expected CSV with at least two columns (step or checkpoint, value)",
                       path=path)
    header = [c.strip() for c in rows[0]]
    has_header = not _is_number(header[1])
    if has_header:
        rows = rows[1:]
        names = header
    else:
        names = [str(i + 1) for i in range(max(len(r) for r in rows))]
    lower = [n.lower() for n in names]
    if has_header and "step" in lower:
        key_col, kind, by = lower.index("step"), "csv", "step"
    elif has_header and lower[0] == "epoch":
        key_col, kind, by = 0, "keras-csv", "epoch"  # Keras CSVLogger: 0-based epochs
    else:
        key_col, kind, by = 0, "csv", "step"
    m = Metrics(path, kind, by)
    skip = {key_col} | ({i for i, n in enumerate(lower) if n in _INDEX_KEYS} if has_header else set())
    bad: dict[int, str] = {}  # column -> why it is not a metric
    for line, r in enumerate(rows, 2 if has_header else 1):
        if len(r) <= key_col or not r[key_col].strip():
            raise EmaError(f"cannot parse metrics: row {line} has no {names[key_col]!r}", path=path)
        try:
            k = _key(r[key_col])
            if by == "epoch":
                k = str(int(k) + 1)  # CSVLogger's epoch e is ModelCheckpoint's {epoch} = e + 1
        except ValueError:
            raise EmaError(f"cannot parse metrics: row {line}: epoch {r[key_col]!r} is not an integer", path=path) from None
        for i, cell in enumerate(r):
            if i in skip or i >= len(names) or i in bad:
                continue
            try:
                val = _num(cell)
            except ValueError:
                bad[i] = f"row {line}: {cell.strip()!r}"  # a text column (not a metric)
                continue
            if val is not None:
                m.series.setdefault(names[i], {})[k] = val
    for i, why in bad.items():
        m.series.pop(names[i], None)
        m.text_columns[names[i]] = why
    if not m.series:
        raise EmaError("cannot parse metrics: no numeric column besides the step or checkpoint; expected CSV "
                       "'step,value' rows", path=path)
    return m


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- TensorBoard


def _looks_like_records(data: bytes) -> bool:
    """A TFRecord file: an 8-byte length whose masked CRC-32C follows it."""
    if len(data) < 12:
        return False
    try:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    except ImportError:
        return False
    return masked_crc32c(data[:8]) == struct.unpack("<I", data[8:12])[0]


_CRC_MAX = 1 << 16  # records up to this size get their data CRC checked (pure Python CRC: ~0.3 s/MB)


def _records(path: str):
    """The records of a TFRecord file; truncated or corrupt records are errors."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EmaError(f"cannot read event file: {e.strerror}", path=path) from None
    if not data:
        raise EmaError("the event file is empty", path=path)
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < 12:
            raise EmaError(f"truncated event file: record at byte {pos} is cut short", path=path)
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if masked_crc32c(data[pos:pos + 8]) != hcrc:
            what = "not a TensorBoard event file" if pos == 0 else f"corrupt event file: bad record header at byte {pos}"
            raise EmaError(what, path=path)
        end = pos + 12 + length
        if end + 4 > n:
            raise EmaError(f"truncated event file: record at byte {pos} is cut short ({n - pos} of {length + 16} bytes)",
                           path=path)
        body = data[pos + 12:end]
        if length <= _CRC_MAX and masked_crc32c(body) != struct.unpack("<I", data[end:end + 4])[0]:
            raise EmaError(f"corrupt event file: bad record checksum at byte {pos}", path=path)
        yield pos, body
        pos = end + 4


_TF_DTYPES = {1: "<f4", 2: "<f8", 19: "<f2", 3: "<i4", 9: "<i8"}  # DT_FLOAT, DOUBLE, HALF, INT32, INT64


def _tensor_scalar(t) -> float | None:
    """The value of a one-element TensorProto, or None."""
    dt = _TF_DTYPES.get(t.dtype)
    if dt is None:
        return None
    if t.tensor_content:
        arr = np.frombuffer(t.tensor_content, dtype=dt)
    elif t.dtype == 1:
        arr = np.asarray(t.float_val, dtype=np.float32)
    elif t.dtype == 2:
        arr = np.asarray(t.double_val)
    elif t.dtype == 19:
        arr = np.asarray(t.half_val, dtype=np.uint16).view(np.float16)
    elif t.dtype == 3:
        arr = np.asarray(t.int_val, dtype=np.int64)
    else:
        arr = np.asarray(t.int64_val, dtype=np.int64)
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _tensorboard(path: str, files: list[str]) -> Metrics:
    try:
        from google.protobuf.message import DecodeError
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        raise EmaError(f"reading TensorBoard event files needs the tensorboard package: {TB_HINT}", path=path) from None
    root = path if os.path.isdir(path) else os.path.dirname(path)
    runs = {os.path.relpath(os.path.dirname(f), root) for f in files}
    multi = len(runs) > 1
    # (name) -> step -> (wall_time, order, value): the last written value per step wins
    found: dict[str, dict[int, tuple[float, int, float]]] = {}
    tags: dict[str, str] = {}
    order = 0
    for fpath in files:
        run = os.path.relpath(os.path.dirname(fpath), root)
        plugin: dict[str, str] = {}  # TF2 writes a tag's plugin metadata with its first value only
        for pos, body in _records(fpath):
            try:
                ev = event_pb2.Event.FromString(body)
            except DecodeError:
                raise EmaError(f"corrupt event file: record at byte {pos} is not an Event", path=fpath) from None
            if not ev.HasField("summary"):
                continue
            for v in ev.summary.value:
                if v.HasField("metadata") and v.metadata.plugin_data.plugin_name:
                    plugin[v.tag] = v.metadata.plugin_data.plugin_name
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    val = float(v.simple_value)
                elif kind == "tensor" and plugin.get(v.tag) == "scalars":
                    val = _tensor_scalar(v.tensor)
                    if val is None:
                        continue
                else:
                    continue
                name = f"{run}/{v.tag}" if multi and run != "." else v.tag
                tags[name] = v.tag
                order += 1
                per = found.setdefault(name, {})
                rec = (ev.wall_time, order, val)
                if ev.step not in per or rec[:2] >= per[ev.step][:2]:
                    per[ev.step] = rec
    if not found:
        raise EmaError("no scalar in the TensorBoard event file(s)", path=path)
    m = Metrics(path, "tensorboard", "step", tags=tags)
    for name in sorted(found):
        m.series[name] = {str(s): rec[2] for s, rec in sorted(found[name].items())}
    return m


# --------------------------------------------------------------------------- matching


def _keys(ck) -> list[str]:
    p = ck.source.path.rstrip("/")
    base = os.path.basename(p)
    keys = [p, base, ck.source.name_hint]
    if ck.step is not None:
        keys.append(str(ck.step))
    return [k for k in keys if k]


def epoch_of(ck) -> int | None:
    """The epoch Keras' ModelCheckpoint put in a checkpoint's name (``{epoch}``, 1-based):
    ``epoch=E`` / ``epoch_E`` if present, else the only integer in the name once
    decimal numbers (``{val_loss:.2f}``) are removed (``ema_cli.steps``)."""
    return steps.epoch_from_name(ck.source.name_hint or ck.source.path)


def lookup(ck, values: dict[str, float], by: str) -> float | None:
    if by == "epoch":
        e = epoch_of(ck)
        return None if e is None else values.get(str(e))
    return next((values[key] for key in _keys(ck) if key in values), None)


def pick_top_k(cks, sel, metrics_path, k, maximize, metric=None) -> tuple[np.ndarray, str]:
    """The indices (into ``cks``) of the ``k`` best of ``sel``, and the metric used.

    Sets ``ck.metric`` on every checkpoint with a value (for ``plan``)."""
    if metrics_path is None or k is None:
        raise UsageError("--metrics and --top-k go together" + (" (--metric names a metric in --metrics)" if metric else ""))
    if maximize is None:
        raise UsageError("--top-k needs --maximize or --minimize (ema-avg does not guess)")
    table = load(metrics_path)
    name, values = table.choose(metric)
    for ck in cks:
        ck.metric = lookup(ck, values, table.by)
    vals = []
    for i in sel:
        v = cks[i].metric
        if v is None:
            how = (f"epoch {epoch_of(cks[i])} (CSVLogger epoch {epoch_of(cks[i]) - 1})" if epoch_of(cks[i]) is not None
                   else "no epoch number in its name") if table.by == "epoch" else (
                   f"step {cks[i].step}" if cks[i].step is not None else "no step")
            raise EmaError(f"no metric {name!r} for this checkpoint ({how}) in {metrics_path}", path=cks[i].path)
        if math.isnan(v):
            raise EmaError(f"{name!r} is NaN for this checkpoint in {metrics_path}", path=cks[i].path)
        vals.append(v)
    if k > len(vals):
        from ema_cli.notices import warn

        warn(f"--top-k {k} but only {len(vals)} checkpoint(s) to choose from: all of them are averaged")
    picked = schedule.top_k(vals, k, maximize)
    return np.asarray(sel)[picked], name
