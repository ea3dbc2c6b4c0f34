"""Shadow names: ``x`` <-> ``x/<suffix>`` (TensorFlow's ExponentialMovingAverage slots)."""

from __future__ import annotations

DEFAULT_SUFFIX = "ExponentialMovingAverage"


def shadow_name(name: str, suffix: str = DEFAULT_SUFFIX) -> str:
    """The shadow of ``name``; TF2 object-based keys keep their ``/.ATTRIBUTES/...`` tail."""
    head, sep, tail = name.partition("/.ATTRIBUTES/")
    return f"{head}/{suffix}{sep}{tail}" if sep else f"{name}/{suffix}"


def is_shadow(name: str, suffix: str = DEFAULT_SUFFIX) -> bool:
    head = name.partition("/.ATTRIBUTES/")[0]
    return head.endswith("/" + suffix)


def original_name(name: str, suffix: str = DEFAULT_SUFFIX) -> str:
    head, sep, tail = name.partition("/.ATTRIBUTES/")
    if not head.endswith("/" + suffix):
        raise ValueError(name)
    head = head[: -len(suffix) - 1]
    return f"{head}{sep}{tail}"


def shadow_tasks(tasks, suffix: str):
    """``--names shadow``: averaged tensors go out under their shadow names and
    every tensor of the newest checkpoint is kept under its own name (raw
    values included), the layout TF's online EMA leaves in a checkpoint."""
    from ema_cli.engine import Task

    out = []
    taken = {t.name for t in tasks}
    for t in tasks:
        if t.action == "average":
            out.append(Task(t.name, t.name, t.info, t.info.dtype, "copy"))
            sname = shadow_name(t.name, suffix)
            if sname in taken:
                # an existing shadow in the input is replaced by the new average
                out = [o for o in out if o.out_name != sname]
            out.append(Task(t.name, sname, t.info, t.out_dtype, "average"))
        elif not any(o.out_name == t.name for o in out):
            out.append(t)
    return out
