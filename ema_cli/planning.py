"""The plan: what to average, with which weights, into which shards.

``make_plan`` opens every input (headers only), orders the checkpoints by
step, checks that names, shapes and dtypes agree across all of them, applies
the windows, takes the float64 weight vector from ``schedule`` (the only
place with averaging math) and decides, per tensor, whether it is averaged or
copied from the newest checkpoint (the selection policy, ``averaged``).  No
tensor data is read except scalar step counters.

A ``Plan`` is pure and picklable: checkpoints (as ``Source``s), weights,
per-tensor ``Task``s and output shards.  Nothing live (no reader, no file)
is in it, so a shard task can run anywhere (``ema_cli.execute``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ema_cli import __version__, dtypes, formats, names, schedule
from ema_cli import steps as steps_mod
from ema_cli.errors import EmaError, UsageError
from ema_cli.formats.base import BUFFER, Reader, Source, TensorInfo
from ema_cli.readers import ReaderPool

# --------------------------------------------------------------------------- options


@dataclass
class Options:
    spec: schedule.Spec = field(default_factory=schedule.Spec)
    order: str = "step"  # or "given"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    dtype: str = "keep"
    allow_nonfinite: bool = False
    last_n: int | None = None
    start_step: int | None = None
    every: int | None = None
    metrics: str | None = None
    metric: str | None = None  # the column / key / tag in --metrics (needed when it holds several)
    top_k: int | None = None
    maximize: bool | None = None
    names: str = "original"  # or "shadow"
    suffix: str = "ExponentialMovingAverage"
    max_shard_size: int | None = None
    threads: int = 0  # 0: one per core, at most 4
    allow_copy_only: bool = False  # a plan that averages no tensor is an error unless this is set
    state_key: str | None = None  # PyTorch: the key holding the state dict (--state-key)
    skip_missing: bool = False  # checkpoints a TF state file names but that are gone: warnings, not an error
    # fsspec options for remote inputs and outputs (--storage-option KEY=VALUE), beside the filesystem's own config
    storage_options: dict = field(default_factory=dict)
    # post-hoc EMA: snapshot series as (gamma, inputs); replaces the plain inputs
    series: list[tuple[float, list[str]]] | None = None
    # a sum beyond the output dtype's range (7e4 -> float16) is an error unless this is set:
    # then it is written as the dtype's largest finite value (with its sign)
    saturate: bool = False


# --------------------------------------------------------------------------- plan


@dataclass
class Checkpoint:
    source: Source
    step: int | None
    step_from: str  # "tensor", "name" or "order"
    weight: float = 0.0
    selected: bool = True
    metric: float | None = None  # its value in --metrics, when given

    @property
    def path(self) -> str:
        return self.source.path


@dataclass(slots=True)
class Task:
    name: str  # name in the inputs
    out_name: str  # name in the output
    info: TensorInfo  # input dtype and shape
    out_dtype: str
    action: str  # "average" or "copy"


@dataclass
class Plan:
    checkpoints: list[Checkpoint]  # every input, in averaging order
    selected: list[int]  # indices into checkpoints that are averaged
    weights: np.ndarray  # float64, one per selected checkpoint
    newest: int  # index of the checkpoint non-averaged tensors come from
    tasks: list[Task]
    skipped: list[str]  # tensors the output format cannot store
    shards: list[list[str]]  # output names per output shard (the unit of work)
    options: Options
    warnings: list[str] = field(default_factory=list)
    # False: writers start fresh, not from the newest input's layout (rename: the
    # input's TF .meta graph and HDF5 groups name the old tensors)
    use_template: bool = True
    # {input name: value} copied instead of the newest input's value (rename: the
    # TF2 object graph rewritten for the new names; --watch: the running averages),
    # already in the task's output dtype (bfloat16 may be its raw uint16 bits)
    overrides: dict = field(default_factory=dict)

    def task(self, out_name: str) -> Task:
        return self._by_out[out_name]

    def __post_init__(self):
        self._by_out = {t.out_name: t for t in self.tasks}

    def shard_info(self, index: int) -> list[TensorInfo]:
        """The output tensors of shard ``index`` (names and dtypes as written)."""
        by_out = self._by_out
        out = []
        for n in self.shards[index]:
            t = by_out[n]
            i = t.info
            out.append(i if (i.name == t.out_name and i.dtype == t.out_dtype) else TensorInfo(t.out_name, t.out_dtype, i.shape))
        return out

    def shard_infos(self) -> list[list[TensorInfo]]:
        return [self.shard_info(k) for k in range(len(self.shards))]

    def describe(self) -> dict:
        """The recipe: recorded in the output, printed by ``plan`` and ``--json``."""
        w = self.weights
        o = self.options
        selection = {"last_n": o.last_n, "start_step": o.start_step, "every": o.every, "top_k": o.top_k,
                     "metric": o.metric, "metrics": o.metrics,
                     "direction": None if o.top_k is None else ("maximize" if o.maximize else "minimize")}
        return {
            "tool": f"ema-avg {__version__}",
            **self.options.spec.describe(),
            "selection": {k: v for k, v in selection.items() if v is not None},
            "dtype": o.dtype,
            "checkpoints": [
                {"path": c.path, "step": c.step, "step_from": c.step_from, "weight": c.weight, "selected": c.selected,
                 "metric": c.metric}
                for c in self.checkpoints
            ],
            "sum_abs_weights": float(np.abs(w).sum()),
            "newest": self.checkpoints[self.newest].path,
        }


def step_from_name(name: str) -> int | None:
    """The step a file or directory name gives (``ema_cli.steps``)."""
    return steps_mod.step_from_name(name)


def _check_agreement(cks: list[Checkpoint], metas: list[dict[str, TensorInfo]]) -> None:
    """Names, shapes and dtypes agree across all inputs.  One comparison of the
    whole dicts per input (C speed, linear); the details are only looked for
    when that finds a difference."""
    ref, ref_path = metas[0], cks[0].path
    for ck, meta in zip(cks[1:], metas[1:]):
        if meta is ref or meta == ref:
            continue
        if meta.keys() != ref.keys():
            missing = [n for n in ref if n not in meta]
            extra = [n for n in meta if n not in ref]
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) of {ref_path}: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
            if extra:
                parts.append(f"has {len(extra)} tensor(s) {ref_path} lacks: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
            raise EmaError("; ".join(parts), path=ck.path)
        for name, info in ref.items():
            other = meta[name]
            if other.shape != info.shape:
                raise EmaError(f"shape {_shape_text(other.shape)} but {_shape_text(info.shape)} in {ref_path}",
                               path=ck.path, tensor=name)
            if other.dtype != info.dtype:
                raise EmaError(f"dtype {other.dtype} but {info.dtype} in {ref_path}", path=ck.path, tensor=name)


def _shape_text(shape: tuple[int, ...]) -> str:
    """A shape for an error message, shortened when it has many dimensions."""
    if len(shape) <= 16:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:8]))}, ... ({len(shape)} dimensions)]"


def averaged(reader: Reader, info: TensorInfo, opts: Options, inc, exc) -> bool:
    """The selection policy: whether ``info`` is averaged (else copied from the newest)."""
    if not dtypes.is_float(info.dtype):
        return False
    if exc and any(r.search(info.name) for r in exc):
        return False
    if inc and any(r.search(info.name) for r in inc):
        return True
    if info.dtype not in dtypes.AVERAGED_BY_DEFAULT and opts.dtype == "keep":
        return False  # float8: copied unless --dtype says what to write
    if names.is_shadow(info.name, opts.suffix):
        return False  # an existing moving-average shadow (x/--suffix) is copied, not averaged again
    return reader.averaged_by_default(info)


def compile_patterns(patterns: list[str], flag: str):
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise UsageError(f"{flag} {p!r} is not a valid regular expression: {e}") from None
    return out


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise UsageError(f"cannot read size {text!r} (e.g. 500MB, 2GB, 1GiB)")
    num, unit = float(m.group(1)), (m.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I")]
    size = int(num * base**power)
    if size <= 0:
        raise UsageError("--max-shard-size must be positive")
    return size


def reader_options(opts: Options) -> tuple[tuple[str, str], ...]:
    """Options for the readers, carried by each Source (picklable)."""
    out = (("state_key", opts.state_key),) if opts.state_key else ()
    if opts.storage_options:
        from ema_cli import storage

        out += (("storage_options", storage.options_text(opts.storage_options)),)
    return out + ((("skip_missing", "1"),) if opts.skip_missing else ())


def _discover(inputs: list[str], opts: Options, pool: ReaderPool, warnings: list[str]):
    """Open the inputs, find each one's step, order them and refuse duplicate steps."""
    sources = formats.resolve_inputs(inputs, reader_options(opts))
    warnings += sources.warnings  # what a directory's scan left out
    cks: list[Checkpoint] = []
    metas: list[dict[str, TensorInfo]] = []
    for src in sources:
        r = pool.get(src)
        metas.append(r.tensors())
        step, how = r.step(), "tensor"
        if step is None:
            parsed = steps_mod.parse(src.name_hint or src.path)
            step, how = parsed.step, "name"
            if parsed.note:
                warnings.append(parsed.note)
        if step is None:
            how = "order"
        cks.append(Checkpoint(src, step, how))
    if opts.order == "step":
        if all(c.step is not None for c in cks):
            order = sorted(range(len(cks)), key=lambda i: cks[i].step)
            cks, metas = [cks[i] for i in order], [metas[i] for i in order]
        elif len(cks) > 1:
            nost = [c.path for c in cks if c.step is None]
            warnings.append(f"no step for {', '.join(nost[:3])}: checkpoints kept in the order given")
    cks, metas = _drop_copies(cks, metas, warnings)
    if opts.order == "given" and not schedule.uses_steps(opts.spec):
        return cks, metas  # the order is the user's; equal steps weigh like any two checkpoints
    seen: dict[int, str] = {}
    for c in cks:
        if c.step is not None:
            if c.step in seen:
                how = ("a schedule over steps needs distinct steps" if opts.order == "given" else
                       "remove one; --order given averages both in the command-line order")
                raise EmaError(f"same step {c.step} as {seen[c.step]} ({how})", path=c.path)
            seen[c.step] = c.path
    return cks, metas


# a trainer's copy of another checkpoint, by the names trainers give it: fairseq's
# checkpoint_best.pt / checkpoint_last.pt / checkpoint.best_loss_X.pt, timm's
# model_best.pth.tar / last.pth.tar, Lightning's last.ckpt, Keras
# ModelCheckpoint(save_best_only=True) files named best.*
_COPY_WORD = re.compile(r"(?:^|[^a-z])(best|last|latest)(?:[^a-z]|$)", re.I)


def _drop_copies(cks: list[Checkpoint], metas: list, warnings: list[str]):
    """A checkpoint named as a trainer's best or last copy whose step is another
    checkpoint's step is that checkpoint again (the same training state): it is
    left out, with a warning, rather than averaged twice.  Both the step (the
    checkpoint's own counter, or its name) and the name must say so."""
    by_step: dict[int, list[int]] = {}
    for i, c in enumerate(cks):
        if c.step is not None:
            by_step.setdefault(c.step, []).append(i)
    drop = []
    for idx in by_step.values():
        if len(idx) < 2:
            continue
        copies = [i for i in idx if any(_COPY_WORD.search(steps_mod.stem(n))
                                        for n in (cks[i].path, cks[i].source.name_hint) if n)]
        if copies and len(copies) < len(idx):
            drop += copies
    if not drop:
        return cks, metas
    keep = [i for i in range(len(cks)) if i not in set(drop)]
    kept_of = {cks[i].step: next(cks[j].path for j in keep if cks[j].step == cks[i].step) for i in drop}
    shown = ", ".join(f"{cks[i].path} (step {cks[i].step}, as {kept_of[cks[i].step]})" for i in drop[:3])
    more = f" and {len(drop) - 3} more" if len(drop) > 3 else ""
    warnings.append(f"left out a trainer's copy of another checkpoint: {shown}{more} (name it alone to average it)")
    return [cks[i] for i in keep], [metas[i] for i in keep]


def make_plan(inputs: list[str], opts: Options, *, out_format: str | None = None,
              pool: ReaderPool | None = None) -> Plan:
    opts.spec.validate()
    if opts.dtype not in dtypes.OUTPUT_CHOICES:
        raise UsageError(f"--dtype must be one of {', '.join(dtypes.OUTPUT_CHOICES)}")
    if opts.order not in ("step", "given"):
        raise UsageError("--order is 'step' or 'given'")
    inc, exc = compile_patterns(opts.include, "--include"), compile_patterns(opts.exclude, "--exclude")
    pool = pool or ReaderPool()
    warnings: list[str] = []
    if opts.series:
        cks, metas, gammas = [], [], []
        for gamma, series_inputs in opts.series:
            c, m = _discover(series_inputs, opts, pool, warnings)
            cks += c
            metas += m
            gammas += [gamma] * len(c)
        order = sorted(range(len(cks)), key=lambda i: (cks[i].step if cks[i].step is not None else -1, gammas[i]))
        cks, metas, gammas = [cks[i] for i in order], [metas[i] for i in order], [gammas[i] for i in order]
    else:
        cks, metas = _discover(inputs, opts, pool, warnings)
    _check_agreement(cks, metas)

    # selection: windows, then metric top-k
    steps = np.array([c.step if c.step is not None else i for i, c in enumerate(cks)], dtype=np.int64)
    sel = schedule.select(steps, last_n=opts.last_n, start_step=opts.start_step, every=opts.every)
    if opts.series:
        at = opts.spec.at_step if opts.spec.at_step is not None else int(steps.max())
        sel = sel[steps[sel] <= at]
        opts.spec.posthoc_gammas = [gammas[i] for i in sel]
    if opts.metrics is not None or opts.top_k is not None or opts.metric is not None:
        from ema_cli.metrics import pick_top_k

        sel, opts.metric = pick_top_k(cks, sel, opts.metrics, opts.top_k, opts.maximize, opts.metric)
    if len(sel) == 0:
        raise UsageError("the windows select no checkpoint")
    weights = opts.spec.weights_for(steps[sel])
    if not np.all(np.isfinite(weights)):
        raise UsageError("the schedule gives non-finite weights")
    warnings += schedule.diagnostics(opts.spec, steps[sel], weights)
    counted = [cks[i] for i in sel if cks[i].step_from == "name" and cks[i].source.step_note]
    if counted and schedule.uses_steps(opts.spec):
        warnings.append(f"{counted[0].source.step_note}: this schedule takes N as the step of each "
                        f"({len(counted)} checkpoint(s)); a per-checkpoint mode (the mean, --decay, --weights) "
                        "needs no steps")
    for c in cks:
        c.selected, c.weight = False, 0.0
    for i, w in zip(sel, weights):
        cks[i].selected, cks[i].weight = True, float(w)
    newest = len(cks) - 1

    # per tensor: averaged or copied, output dtype and name
    can_store = formats.get(out_format).can_store if out_format else None
    # signed weights (post-hoc EMA) must not mix statistics buffers: a variance could turn
    # negative; like EDM2, they come from the newest snapshot
    buffers_from_newest = bool(opts.series) or bool(np.any(weights < 0))
    tasks, skipped, buffers = [], [], []
    # one lease for the loop (not one per tensor: a header may list millions)
    with pool.lease(cks[newest].source) as reader:
        for name, info in metas[newest].items():
            avg = averaged(reader, info, opts, inc, exc)
            if avg and buffers_from_newest and reader.role(info).kind == BUFFER \
                    and not any(r.search(name) for r in inc):
                avg = False
                buffers.append(name)
            out_dtype = opts.dtype if (avg and opts.dtype != "keep") else info.dtype
            if can_store is not None and not can_store(out_dtype):
                skipped.append(name)
                continue
            tasks.append(Task(name, name, info, out_dtype, "average" if avg else "copy"))
    newest_reader = pool.get(cks[newest].source)
    if opts.names != "original":
        tasks = names.shadow_tasks(tasks, opts.suffix)
    for t in tasks:  # names no output format can store: refused before any work
        _check_out_name(t.out_name, cks[newest].path)
    if skipped:
        warnings.append(f"{len(skipped)} tensor(s) the output format cannot store were left out: {', '.join(skipped[:5])}")
    outside = newest_reader.extras().get("outside_state_dict") if out_format != cks[newest].source.format else None
    if outside and out_format is not None:
        shown = list(outside)[:5]
        warnings.append(f"{cks[newest].path}: what the file holds besides its state dict ({', '.join(map(str, shown))}"
                        + (" ..." if len(outside) > 5 else "") + f") is not written to {out_format} output "
                        "(only PyTorch output keeps it)")
    if buffers:
        warnings.append(f"{len(buffers)} statistics buffer(s) taken from the newest checkpoint, not averaged with "
                        f"signed weights: {', '.join(buffers[:3])}" + (" ..." if len(buffers) > 3 else ""))
    if not any(t.action == "average" for t in tasks) and not opts.allow_copy_only:
        raise EmaError(_nothing_averaged(tasks, newest_reader, metas[newest]), path=cks[newest].path)
    if len(sel) == 1 and len(cks) >= 1:
        why = " (the windows or --top-k left one)" if len(cks) > 1 else ""
        warnings.append(f"only one checkpoint is selected{why}: the output equals {cks[int(sel[0])].path}")

    shards = shard_tasks(tasks, opts.max_shard_size)
    return Plan(cks, [int(i) for i in sel], weights, newest, tasks, skipped, shards, opts, warnings)


def _check_out_name(name: str, path: str) -> None:
    if not name:
        raise EmaError("a tensor has an empty name, which no output format can store", path=path, tensor=name)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise EmaError("the tensor's name is not valid Unicode (a lone surrogate)", path=path, tensor=name) from None


def _nothing_averaged(tasks: list[Task], reader: Reader, meta: dict[str, TensorInfo]) -> str:
    """Why a plan averages no tensor, for the error message."""
    from collections import Counter

    kinds = Counter(reader.role(meta[t.name]).kind for t in tasks if t.name in meta)
    detail = ", ".join(f"{k}: {v}" for k, v in kinds.most_common())
    return (f"nothing to average: all {len(tasks)} tensor(s) would be copied from the newest checkpoint "
            f"({detail}); see 'ema-avg inspect', average some with --include REGEX, "
            "or pass --allow-copy-only to accept a copy")


def split_shards(tasks: list[Task], n: int) -> list[list[str]]:
    """The tasks in ``n`` contiguous shards of about equal bytes (a Dask run into
    a directory: one shard per worker); fewer when there are fewer tensors."""
    sizes = [dtypes.itemsize(t.out_dtype) * t.info.numel for t in tasks]
    total = sum(sizes)
    n = max(1, min(n, len(tasks)))
    shards: list[list[str]] = [[]]
    done = 0
    for t, nb in zip(tasks, sizes):
        # start the next shard when this one has reached its share of the bytes
        if shards[-1] and len(shards) < n and done >= total * len(shards) / n:
            shards.append([])
        shards[-1].append(t.out_name)
        done += nb
    return shards


def shard_tasks(tasks: list[Task], max_size: int | None) -> list[list[str]]:
    """Greedy packing in order, as Hugging Face's ``save_pretrained`` does."""
    if not max_size:
        return [[t.out_name for t in tasks]]
    shards: list[list[str]] = [[]]
    size = 0
    for t in tasks:
        nb = dtypes.itemsize(t.out_dtype) * t.info.numel
        if shards[-1] and size + nb > max_size:
            shards.append([])
            size = 0
        shards[-1].append(t.out_name)
        size += nb
    return shards

