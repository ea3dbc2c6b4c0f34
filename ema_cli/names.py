"""Shadow names: ``x`` <-> ``x/<suffix>`` (TensorFlow's ExponentialMovingAverage slots).

The name rules live here (this module imports no plan or engine; the maps
built from a checkpoint with the selection policy are in ``ema_cli.maps``):

* :func:`shadow_name`, :func:`is_shadow`, :func:`original_name`: the suffix
  rule.  TF2 object-based keys keep their ``/.ATTRIBUTES/...`` tail: the shadow
  of ``w/.ATTRIBUTES/VARIABLE_VALUE`` is
  ``w/ExponentialMovingAverage/.ATTRIBUTES/VARIABLE_VALUE``.
* :func:`shadow_tasks`: ``average --names shadow``.
"""

from __future__ import annotations

import dataclasses
import re

from ema_cli.errors import UsageError

DEFAULT_SUFFIX = "ExponentialMovingAverage"
ATTRIBUTES = "/.ATTRIBUTES/"  # TF2 object-based keys: <object path>/.ATTRIBUTES/<attribute>
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"  # TF2's object graph: not a variable
TO_ORIGINAL, TO_SHADOW = "to-original", "to-shadow"


# --------------------------------------------------------------------------- the suffix rule


def check_suffix(suffix: str) -> str:
    """A usable ``--suffix``: one non-empty name segment."""
    if not suffix or "/" in suffix or suffix in (".", "..") or suffix != suffix.strip():
        raise UsageError(f"--suffix must be one name segment without '/' or surrounding spaces (got {suffix!r}), "
                         "e.g. ExponentialMovingAverage or SWAMovingAverage")
    return suffix


def shadow_name(name: str, suffix: str = DEFAULT_SUFFIX) -> str:
    """The shadow of ``name``; TF2 object-based keys keep their ``/.ATTRIBUTES/...`` tail."""
    head, sep, tail = name.partition(ATTRIBUTES)
    return f"{head}/{suffix}{sep}{tail}" if sep else f"{name}/{suffix}"


def is_shadow(name: str, suffix: str = DEFAULT_SUFFIX) -> bool:
    head = name.partition(ATTRIBUTES)[0]
    return head.endswith("/" + suffix) and len(head) > len(suffix) + 1


def original_name(name: str, suffix: str = DEFAULT_SUFFIX) -> str:
    """The tensor ``name`` is the shadow of (ValueError if it is not a shadow)."""
    head, sep, tail = name.partition(ATTRIBUTES)
    if not is_shadow(name, suffix):
        raise ValueError(name)
    head = head[: -len(suffix) - 1]
    return f"{head}{sep}{tail}"


_OTHER_SUFFIX = re.compile(r"/([^/]*MovingAverage[^/]*)$")


def other_suffixes(names, suffix: str) -> list[str]:
    """Shadow-like suffixes present in ``names`` other than ``suffix`` (for hints)."""
    found: dict[str, int] = {}
    for n in names:
        m = _OTHER_SUFFIX.search(n.partition(ATTRIBUTES)[0])
        if m and m.group(1) != suffix:
            found[m.group(1)] = found.get(m.group(1), 0) + 1
    return sorted(found, key=lambda s: -found[s])


# --------------------------------------------------------------------------- average --names shadow


def shadow_tasks(tasks, suffix: str):
    """``--names shadow``: each averaged tensor ``x`` goes out under
    ``x/SUFFIX``, and every tensor of the newest checkpoint is kept under its own
    name (the averaged ones with their raw values): the layout TF's online EMA
    leaves in a training checkpoint.  A shadow already in the input (averaging a
    run with online EMA) is replaced by the new average; each name appears once,
    in the input's order with every shadow right after its variable."""
    check_suffix(suffix)
    new_shadows = {shadow_name(t.name, suffix) for t in tasks if t.action == "average"}
    out = []
    for t in tasks:
        if t.action == "average":
            if t.name not in new_shadows:  # (only with --include matching a shadow)
                out.append(dataclasses.replace(t, out_dtype=t.info.dtype, action="copy"))
            out.append(dataclasses.replace(t, out_name=shadow_name(t.name, suffix)))
        elif t.name not in new_shadows:
            out.append(t)
    return out
