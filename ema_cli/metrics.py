"""``--metrics FILE --top-k K``: pick the K best checkpoints by a metric.

FILE is CSV (a header row, first column the step or checkpoint name, the
metric in the second column) or JSON (an object ``{step_or_name: value}`` or
a list of ``{"step"|"checkpoint": ..., "value": ...}``)."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from ema_cli import schedule
from ema_cli.errors import EmaError, UsageError


def load(path: str) -> dict[str, float]:
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise EmaError(f"cannot read metrics: {e.strerror}", path=path) from None
    out: dict[str, float] = {}
    try:
        if path.endswith(".json") or text.lstrip().startswith(("{", "[")):
            doc = json.loads(text)
            if isinstance(doc, dict):
                items = doc.items()
            else:
                items = []
                for row in doc:
                    key = row.get("step", row.get("checkpoint", row.get("path")))
                    val = row.get("value", row.get("metric"))
                    items.append((key, val))
        else:
            rows = [r for r in csv.reader(text.splitlines()) if r and not r[0].startswith("#")]
            if rows and not _is_number(rows[0][1] if len(rows[0]) > 1 else ""):
                rows = rows[1:]  # header
            items = [(r[0], r[1]) for r in rows]
        for k, v in items:
            val = float(v)
            if math.isnan(val):
                raise ValueError(f"NaN for {k}")
            out[str(k).strip()] = val
    except (ValueError, TypeError, IndexError, AttributeError, json.JSONDecodeError) as e:
        raise EmaError(f"cannot parse metrics ({e}); expected CSV 'step,value' rows or a JSON object", path=path) from None
    if not out:
        raise EmaError("no metrics in the file", path=path)
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _keys(ck) -> list[str]:
    p = ck.source.path.rstrip("/")
    base = os.path.basename(p)
    keys = [p, base, ck.source.name_hint]
    if ck.step is not None:
        keys.append(str(ck.step))
    return keys


def pick_top_k(cks, sel, metrics_path, k, maximize) -> np.ndarray:
    if metrics_path is None or k is None:
        raise UsageError("--metrics and --top-k go together")
    if maximize is None:
        raise UsageError("--top-k needs --maximize or --minimize (ema-avg does not guess)")
    table = load(metrics_path)
    vals = []
    for i in sel:
        v = next((table[key] for key in _keys(cks[i]) if key in table), None)
        if v is None:
            raise EmaError(f"no metric for this checkpoint in {metrics_path}", path=cks[i].path)
        vals.append(v)
    picked = schedule.top_k(vals, k, maximize)
    return np.asarray(sel)[picked]
