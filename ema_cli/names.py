"""Shadow names: ``x`` <-> ``x/<suffix>`` (TensorFlow's ExponentialMovingAverage slots).

Everything about names lives here:

* :func:`shadow_name`, :func:`is_shadow`, :func:`original_name`: the suffix
  rule.  TF2 object-based keys keep their ``/.ATTRIBUTES/...`` tail: the shadow
  of ``w/.ATTRIBUTES/VARIABLE_VALUE`` is
  ``w/ExponentialMovingAverage/.ATTRIBUTES/VARIABLE_VALUE``.
* :func:`averaged_names`: the averaged set of one checkpoint, exactly what
  ``average`` averages (``engine._averaged``: for a TF1 checkpoint with a
  ``.meta``, its trainable + moving-average collections; else the format's
  rules), in the checkpoint's order.
* :func:`restore_map`: TensorFlow's ``ema.variables_to_restore()`` as names,
  offline, for any format.
* :func:`rename_map` / :func:`rename_plan` / :func:`run_rename`: ``rename
  --to-original`` (the offline ``swapping_saver``) and ``--to-shadow``, as an
  engine plan whose tasks are all copies with new output names, written by
  ``engine.run``.  A tensor whose value names other tensors (the TF2 object
  graph: each variable's ``checkpoint_key``) is rewritten at plan time by its
  format (``tf_fmt.rename_overrides``) and handed to the writer in place of
  the input's value, so ``tf.train.Checkpoint.restore`` finds the renamed keys.
* :func:`shadow_tasks`: ``average --names shadow``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ema_cli import engine
from ema_cli.errors import EmaError, UsageError
from ema_cli.notices import warn

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


# --------------------------------------------------------------------------- one checkpoint


def open_one(ckpt: str, pool, what: str):
    """The single checkpoint ``ckpt`` names, opened from ``pool``: (source, reader)."""
    sources = engine.formats.resolve_inputs([ckpt])
    for w in sources.warnings:
        warn(w)
    if len(sources) != 1:
        newest = max(sources, key=lambda s: (engine.step_from_name(s.name_hint or s.path) or -1))
        raise UsageError(f"{ckpt}: names {len(sources)} checkpoints; {what} takes one (e.g. {newest.path})")
    return sources[0], pool.get(sources[0])


def averaged_names(reader, suffix: str = DEFAULT_SUFFIX, include=(), exclude=()) -> list[str]:
    """The checkpoint's averaged set, in its order: the tensors ``average`` would
    average (with ``--include``/``--exclude``).  For a TF1 checkpoint with a
    ``.meta`` that is exactly its ``trainable_variables`` +
    ``moving_average_variables`` (TensorFlow's default set); otherwise the
    format's rules (existing ``x/SUFFIX`` shadows are never in it)."""
    opts = engine.Options(include=list(include), exclude=list(exclude), suffix=suffix)
    inc, exc = engine._compile(opts.include, "--include"), engine._compile(opts.exclude, "--exclude")
    return [n for n, info in reader.tensors().items() if engine._averaged(reader, info, opts, inc, exc, is_shadow)]


def averaged_from(reader) -> str:
    """Where the averaged set came from: ``meta collections``, ``name rules`` or ``format rules``."""
    extras = reader.extras() if hasattr(reader, "extras") else {}
    return extras.get("averaged_from", "format rules")


def restore_map(reader, suffix: str = DEFAULT_SUFFIX, include=(), exclude=()) -> dict[str, str]:
    """``{restore name: variable name}``: what ``ema.variables_to_restore()``
    returns, as names, for a graph holding the checkpoint's variables.

    Each tensor of the averaged set maps from its shadow name; every other
    tensor maps from its own name unless that name is already a key (so the
    shadows an online EMA left in the checkpoint are not listed under their
    own names).  Keys are checkpoint keys: a partitioned variable is one key
    (``part/ExponentialMovingAverage -> part``), where TensorFlow lists each
    slice (``part/part_0/ExponentialMovingAverage -> part/part_0``).  The TF2
    object graph is not a variable and is left out."""
    averaged = averaged_names(reader, suffix, include, exclude)
    out = {shadow_name(n, suffix): n for n in averaged}
    chosen = set(averaged)
    for n in reader.tensors():
        if n in chosen or n == OBJECT_GRAPH_KEY:
            continue
        out.setdefault(n, n)
    return out


# --------------------------------------------------------------------------- rename


def rename_map(reader, direction: str, suffix: str = DEFAULT_SUFFIX, include=(), exclude=()) -> dict[str, str]:
    """``{input name: output name}`` for every tensor the output keeps (input
    order); tensors left out are absent.

    ``to-original``: every ``x/SUFFIX`` is written as ``x``; an ``x`` it replaces
    is dropped (the offline ``swapping_saver``).  ``to-shadow``: every tensor
    of the averaged set ``x`` is written as ``x/SUFFIX``; the rest unchanged."""
    tensors = reader.tensors()
    path = reader.path
    if direction == TO_ORIGINAL:
        shadows = [n for n in tensors if is_shadow(n, suffix)]
        if not shadows:
            others = other_suffixes(tensors, suffix)
            hint = (f"; it has shadows named */{others[0]}: use --suffix {others[0]}" if others
                    else "; it holds no moving averages (a TF1 training checkpoint with online EMA does)")
            raise EmaError(f"nothing to rename: no tensor is named */{suffix}{hint}", path=path)
        replaced = set()
        for s in shadows:
            orig = original_name(s, suffix)
            have = tensors.get(orig)
            if have is not None:
                sh = tensors[s]
                if have.shape != sh.shape or have.dtype != sh.dtype:
                    raise EmaError(f"its shadow {s!r} is {sh.dtype} {list(sh.shape)} but it is "
                                   f"{have.dtype} {list(have.shape)}: not its moving average", path=path, tensor=orig)
                replaced.add(orig)
        out = {}
        for n in tensors:
            if is_shadow(n, suffix):
                out[n] = original_name(n, suffix)
            elif n not in replaced:
                out[n] = n
        return out
    if direction == TO_SHADOW:
        existing = [n for n in tensors if is_shadow(n, suffix)]
        if existing:
            raise EmaError(f"already holds {len(existing)} shadow tensor(s) named */{suffix} ({existing[0]}, ...): "
                           "--to-shadow would mix them with the renamed ones (use --to-original, or another --suffix)",
                           path=path)
        averaged = set(averaged_names(reader, suffix, include, exclude))
        if not averaged:
            raise EmaError("nothing to rename: no tensor is in the averaged set (no float model weights; "
                           "--include REGEX adds tensors)", path=path)
        return {n: (shadow_name(n, suffix) if n in averaged else n) for n in tensors}
    raise UsageError(f"unknown rename direction {direction!r}")


@dataclass
class RenamePlan(engine.Plan):
    """A plan of copies under new names.  It records no recipe: the values are
    the input's, so the output keeps the input's metadata as it is (its
    ``ema_avg`` recipe included).  Its ``overrides`` hold the rewritten TF2
    object graph (``engine.Plan.overrides``)."""

    rename: dict | None = None

    def describe(self) -> None:
        return None


def rename_plan(ckpt: str, direction: str, suffix: str = DEFAULT_SUFFIX, *, include=(), exclude=(),
                max_shard_size: int | None = None, threads: int = 0, pool=None):
    """The plan :func:`run_rename` writes for ``rename``: one checkpoint, every
    tensor a copy (same dtype) under its new name.  The writers start fresh
    (``use_template=False``): the input's layout (a TF ``.meta`` graph, an HDF5
    file's groups) names the old tensors."""
    check_suffix(suffix)
    pool = pool or engine.ReaderPool()
    src, r = open_one(ckpt, pool, "rename")
    mapping = rename_map(r, direction, suffix, include, exclude)
    tensors = r.tensors()
    tasks = [engine.Task(n, out, tensors[n], tensors[n].dtype, "copy") for n, out in mapping.items()]
    overrides = {}
    if src.format == "tf":  # the TF2 object graph names the variables' keys
        from ema_cli.formats import tf_fmt

        overrides = tf_fmt.rename_overrides(r, mapping)
    step, how = r.step(), "tensor"
    if step is None:
        step, how = engine.step_from_name(src.name_hint or src.path), "name"
    ck = engine.Checkpoint(src, step, how if step is not None else "order", weight=1.0, selected=True)
    renamed = sum(1 for n, out in mapping.items() if n != out)
    info = {"direction": direction, "suffix": suffix, "source": src.path, "renamed": renamed,
            "dropped": len(tensors) - len(mapping), "rewritten": sorted(overrides)}
    opts = engine.Options(suffix=suffix, include=list(include), exclude=list(exclude), threads=threads,
                          max_shard_size=max_shard_size)
    return RenamePlan([ck], [0], np.array([1.0]), 0, tasks, [], engine._shard(tasks, max_shard_size), opts, [],
                      use_template=False, rename=info, overrides=overrides)


def run_rename(plan: RenamePlan, output: str, out_format: str, *, force: bool = False, pool=None,
               timings: dict | None = None) -> engine.Result:
    """``engine.run`` of a rename plan (its overrides: the rewritten object graph)."""
    return engine.run(plan, output, out_format, force=force, pool=pool or engine.ReaderPool(), timings=timings)


# --------------------------------------------------------------------------- average --names shadow


def shadow_tasks(tasks, suffix: str):
    """``--names shadow``: each averaged tensor ``x`` goes out under
    ``x/SUFFIX``, and every tensor of the newest checkpoint is kept under its own
    name (the averaged ones with their raw values): the layout TF's online EMA
    leaves in a training checkpoint.  A shadow already in the input (averaging a
    run with online EMA) is replaced by the new average; each name appears once,
    in the input's order with every shadow right after its variable."""
    check_suffix(suffix)
    Task = engine.Task
    new_shadows = {shadow_name(t.name, suffix) for t in tasks if t.action == "average"}
    out = []
    for t in tasks:
        if t.action == "average":
            if t.name not in new_shadows:  # (only with --include matching a shadow)
                out.append(Task(t.name, t.name, t.info, t.info.dtype, "copy"))
            out.append(Task(t.name, shadow_name(t.name, suffix), t.info, t.out_dtype, "average"))
        elif t.name not in new_shadows:
            out.append(t)
    return out
