"""Name maps of one checkpoint, built from the plan's selection policy and the
name rules in ``ema_cli.names``:

* :func:`averaged_names`: the averaged set of one checkpoint, exactly what
  ``average`` averages (``plan.averaged``: for a TF1 checkpoint with a
  ``.meta``, its trainable + moving-average collections; else the format's
  rules), in the checkpoint's order.
* :func:`restore_map`: TensorFlow's ``ema.variables_to_restore()`` as names,
  offline, for any format.
* :func:`rename_map` / :func:`rename_plan` / :func:`run_rename`: ``rename
  --to-original`` (the offline ``swapping_saver``) and ``--to-shadow``, as a
  plan whose tasks are all copies with new output names, written by
  ``engine.run``.  A tensor whose value names other tensors (the TF2 object
  graph: each variable's ``checkpoint_key``) is rewritten at plan time by its
  format (``tf_fmt.rename_overrides``) and handed to the writer in place of
  the input's value, so ``tf.train.Checkpoint.restore`` finds the renamed keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ema_cli import engine, formats, planning as plan_mod
from ema_cli.errors import EmaError, UsageError
from ema_cli.names import (DEFAULT_SUFFIX, OBJECT_GRAPH_KEY, TO_ORIGINAL, TO_SHADOW, check_suffix, is_shadow,
                           original_name, other_suffixes, shadow_name)
from ema_cli.notices import warn
from ema_cli.readers import ReaderPool


# --------------------------------------------------------------------------- one checkpoint


def open_one(ckpt: str, pool, what: str, options: tuple[tuple[str, str], ...] = ()):
    """The single checkpoint ``ckpt`` names, opened from ``pool``: (source, reader).
    ``options``: the Source's reader options (``planning.reader_options``)."""
    sources = formats.resolve_inputs([ckpt], options)
    for w in sources.warnings:
        warn(w)
    if len(sources) != 1:
        newest = max(sources, key=lambda s: (plan_mod.step_from_name(s.name_hint or s.path) or -1))
        raise UsageError(f"{ckpt}: names {len(sources)} checkpoints; {what} takes one (e.g. {newest.path})")
    return sources[0], pool.get(sources[0])


def averaged_names(reader, suffix: str = DEFAULT_SUFFIX, include=(), exclude=()) -> list[str]:
    """The checkpoint's averaged set, in its order: the tensors ``average`` would
    average (with ``--include``/``--exclude``).  For a TF1 checkpoint with a
    ``.meta`` that is exactly its ``trainable_variables`` +
    ``moving_average_variables`` (TensorFlow's default set); otherwise the
    format's rules (existing ``x/SUFFIX`` shadows are never in it)."""
    opts = plan_mod.Options(include=list(include), exclude=list(exclude), suffix=suffix)
    inc = plan_mod.compile_patterns(opts.include, "--include")
    exc = plan_mod.compile_patterns(opts.exclude, "--exclude")
    return [n for n, info in reader.tensors().items() if plan_mod.averaged(reader, info, opts, inc, exc)]


def averaged_from(reader) -> str:
    """Where the averaged set came from: ``meta collections``, ``name rules`` or ``format rules``."""
    return reader.extras().get("averaged_from", "format rules")


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
class RenamePlan(plan_mod.Plan):
    """A plan of copies under new names.  It records no recipe: the values are
    the input's, so the output keeps the input's metadata as it is (its
    ``ema_avg`` recipe included).  Its ``overrides`` hold the rewritten TF2
    object graph (``Plan.overrides``)."""

    rename: dict | None = None

    def describe(self) -> None:
        return None


def rename_plan(ckpt: str, direction: str, suffix: str = DEFAULT_SUFFIX, *, include=(), exclude=(),
                max_shard_size: int | None = None, threads: int = 0, pool=None, storage_options: dict | None = None):
    """The plan :func:`run_rename` writes for ``rename``: one checkpoint, every
    tensor a copy (same dtype) under its new name.  The writers start fresh
    (``use_template=False``): the input's layout (a TF ``.meta`` graph, an HDF5
    file's groups) names the old tensors."""
    check_suffix(suffix)
    pool = pool or ReaderPool()
    opts = plan_mod.Options(suffix=suffix, include=list(include), exclude=list(exclude), threads=threads,
                            max_shard_size=max_shard_size, storage_options=dict(storage_options or {}))
    src, r = open_one(ckpt, pool, "rename", plan_mod.reader_options(opts))
    mapping = rename_map(r, direction, suffix, include, exclude)
    tensors = r.tensors()
    tasks = [plan_mod.Task(n, out, tensors[n], tensors[n].dtype, "copy") for n, out in mapping.items()]
    overrides = {}
    if src.format == "tf":  # the TF2 object graph names the variables' keys
        from ema_cli.formats import tf_fmt

        overrides = tf_fmt.rename_overrides(r, mapping)
    step, how = r.step(), "tensor"
    if step is None:
        step, how = plan_mod.step_from_name(src.name_hint or src.path), "name"
    ck = plan_mod.Checkpoint(src, step, how if step is not None else "order", weight=1.0, selected=True)
    renamed = sum(1 for n, out in mapping.items() if n != out)
    info = {"direction": direction, "suffix": suffix, "source": src.path, "renamed": renamed,
            "dropped": len(tensors) - len(mapping), "rewritten": sorted(overrides)}
    return RenamePlan([ck], [0], np.array([1.0]), 0, tasks, [], plan_mod.shard_tasks(tasks, max_shard_size), opts, [],
                      use_template=False, rename=info, overrides=overrides)


def run_rename(plan: RenamePlan, output: str, out_format: str, *, force: bool = False, pool=None,
               timings: dict | None = None):
    """``engine.run`` of a rename plan (its overrides: the rewritten object graph)."""
    return engine.run(plan, output, out_format, force=force, pool=pool or ReaderPool(), timings=timings)
