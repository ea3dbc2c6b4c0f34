"""Plan, then stream.

``make_plan`` opens every input (headers only), orders the checkpoints by
step, checks that names, shapes and dtypes agree across all of them, applies
the windows, computes the float64 weight vector (``schedule``) and decides,
per tensor, whether it is averaged or copied from the newest checkpoint.  No
tensor data is read except scalar step counters.

``run`` then computes each output shard: for each tensor a weighted sum over
the checkpoints, accumulated in float64 in cache-sized blocks and rounded once
to the output dtype, handed to the format's writer.  ``compute_tensor`` and
``run_shard`` are pure functions of the plan (readers are reopened from the
plan's picklable ``Source`` objects), so shards can run in threads here or on
a cluster later.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ema_cli import __version__, dtypes, formats, kernel, schedule
from ema_cli import steps as steps_mod
from ema_cli.errors import EmaError, UsageError
from ema_cli.formats.base import BUFFER, Reader, Source, TensorInfo
from ema_cli.notices import warn
from ema_cli.output import Staged, check_target

BLOCK = kernel.BLOCK  # elements per float64 accumulation block (512 KiB; two of them stay in L2)
CHUNK = kernel.CHUNK  # bytes of rounded output a thread stages before handing them to a streaming writer
STREAM_MIN = 1 << 20  # averaged tensors of at least this many bytes are streamed to writers with write_range
RELEASE_STEP = 16 << 20  # while streaming, consumed input pages are unmapped every this many bytes per input
RELEASE_MIN = 1 << 19  # tensors smaller than this are not released (a reader drops whole pages of >= 512 KiB)


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
    # TF2 object graph rewritten for the new names)
    overrides: dict = field(default_factory=dict)

    def task(self, out_name: str) -> Task:
        return self._by_out[out_name]

    def __post_init__(self):
        self._by_out = {t.out_name: t for t in self.tasks}

    def shard_infos(self) -> list[list[TensorInfo]]:
        def out_info(t: Task) -> TensorInfo:
            i = t.info
            return i if (i.name == t.out_name and i.dtype == t.out_dtype) else TensorInfo(t.out_name, t.out_dtype, i.shape)

        by_out = self._by_out
        return [[out_info(by_out[n]) for n in shard] for shard in self.shards]

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


_FD_LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)


def open_files_limit() -> int | None:
    """The soft limit on open file descriptors (``ulimit -n``), None if unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def default_max_open() -> int:
    """How many readers a ReaderPool keeps open: a quarter of the descriptor
    limit (a reader may hold several: HDF5, TF shards; the writer and Python
    need some too), at most 256."""
    limit = open_files_limit()
    return 256 if limit is None else max(1, min(256, limit // 4))


def fd_limit_error(path: str | None, err: BaseException | None = None) -> EmaError:
    """The one-line error for a descriptor limit that was really hit."""
    if isinstance(err, OSError) and err.errno == errno.ENFILE:
        return EmaError("cannot open: the system-wide limit on open files is reached "
                        "(fs.file-max); close other programs or raise it (sysctl fs.file-max)", path=path)
    limit = open_files_limit()
    now = f" is {limit}" if limit is not None else ""
    return EmaError(f"cannot open: too many open files (this process's limit, ulimit -n{now}); "
                    "raise it with 'ulimit -n 65536' (or ask for a higher hard limit) and run again", path=path)


def _is_fd_limit(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in _FD_LIMIT_ERRNOS:
        return True
    text = str(err)  # formats wrap the OSError (h5py, TensorFlow): look at the message
    return isinstance(err, (OSError, EmaError)) and ("Too many open files" in text or "errno = 24" in text)


class _Entry:
    __slots__ = ("reader", "leases")

    def __init__(self, reader: Reader):
        self.reader = reader
        self.leases = 0


class ReaderPool:
    """Readers by checkpoint path, opened lazily, at most ``max_open`` at a time.

    ``lease(source)`` yields an open reader that stays open for the block; the
    least recently used readers that no thread holds are closed when more than
    ``max_open`` are open (2,000 inputs with ``ulimit -n 1024``; memory stays
    bounded for formats that cache per file), and reopened when needed again.
    ``get(source)`` returns a handle whose every call runs under its own lease
    (a handle kept across calls never sees its reader closed under it).  When
    opening hits the descriptor limit anyway, the unleased readers are closed
    and the open retried once; then the error names the file and the limit."""

    def __init__(self, max_open: int | None = None):
        self.max_open = max_open or default_max_open()
        self._open: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}  # one opener per path at a time

    def get(self, source: Source) -> "PooledReader":
        return PooledReader(self, source)

    @contextmanager
    def lease(self, source: Source):
        entry = self._acquire(source)
        try:
            yield entry.reader
        finally:
            self._unlease(entry)

    def _unlease(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1

    def _acquire(self, source: Source) -> _Entry:
        path = source.path
        with self._lock:
            entry = self._open.get(path)
            if entry is not None:
                entry.leases += 1
                self._open.move_to_end(path)
                return entry
            opener = self._opening.setdefault(path, threading.Lock())
        with opener:
            with self._lock:  # another thread may have opened it meanwhile
                entry = self._open.get(path)
                if entry is not None:
                    entry.leases += 1
                    self._open.move_to_end(path)
                    return entry
                self._evict(self.max_open - 1)
            reader = self._open_reader(source)
            with self._lock:
                entry = self._open[path] = _Entry(reader)
                entry.leases += 1
                self._opening.pop(path, None)
            return entry

    def _open_reader(self, source: Source) -> Reader:
        try:
            return formats.open_reader(source)
        except (OSError, EmaError) as e:
            if not _is_fd_limit(e):
                raise
        self.make_room()
        try:
            return formats.open_reader(source)
        except (OSError, EmaError) as e:
            if _is_fd_limit(e):
                raise fd_limit_error(getattr(e, "filename", None) or source.path, e) from None
            raise

    def call(self, source: Source, method: str, *args):
        """``reader.method(*args)`` under a lease (no context manager: this runs
        once per tensor and input); a descriptor limit hit inside the call makes
        room and the call runs once more before the limit is reported."""
        for attempt in (0, 1):
            entry = self._acquire(source)
            try:
                return getattr(entry.reader, method)(*args)
            except (OSError, EmaError) as e:
                if not _is_fd_limit(e):
                    raise
                if attempt:
                    raise fd_limit_error(source.path, e) from None
            finally:
                self._unlease(entry)
            self.make_room()

    def read(self, source: Source, name: str):
        """One tensor of one checkpoint (``reader.read`` under a lease)."""
        return self.call(source, "read", name)

    def make_room(self) -> None:
        """The descriptor limit was hit: close every reader no thread holds, and
        keep fewer open from now on."""
        with self._lock:
            self.max_open = max(1, min(self.max_open, len(self._open) // 2 or 1))
            self._evict(0)

    def _evict(self, keep: int) -> None:
        """Close least recently used, unleased readers until at most ``keep`` are open (lock held)."""
        if len(self._open) <= keep:
            return
        for path in list(self._open):
            if len(self._open) <= keep:
                break
            entry = self._open[path]
            if entry.leases == 0:
                del self._open[path]
                entry.reader.close()

    def release(self, source: Source, name: str, first: int = 0, last: int | None = None) -> None:
        """Let an open reader drop a tensor's mapped pages (see SafetensorsReader.release);
        a reader that is not open has nothing mapped to drop, so it is not reopened."""
        with self._lock:
            entry = self._open.get(source.path)
            if entry is None:
                return
            entry.leases += 1
        try:
            release = getattr(entry.reader, "release", None)
            if release is not None:
                release(name, first, last)
        finally:
            with self._lock:
                entry.leases -= 1

    def open_count(self) -> int:
        return len(self._open)

    def close(self):
        with self._lock:
            entries = list(self._open.values())
            self._open.clear()
        for e in entries:
            e.reader.close()


class PooledReader:
    """A checkpoint's reader as ``ReaderPool.get`` hands it out: each call
    leases the reader from the pool (reopening it if it was closed to stay
    under the limit), so holding a handle costs no file descriptor.  A call
    that hits the descriptor limit (a format opening a file lazily) makes room
    in the pool and runs once more before the limit is reported."""

    def __init__(self, pool: ReaderPool, source: Source):
        self._pool = pool
        self.source = source

    def _call(self, method: str, *args):
        return self.__dict__["_pool"].call(self.__dict__["source"], method, *args)

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def format(self) -> str:
        return self.source.format

    def tensors(self) -> dict[str, TensorInfo]:
        return self._call("tensors")

    def read(self, name: str):
        return self._call("read", name)

    def metadata(self) -> dict[str, str]:
        return self._call("metadata")

    def step(self):
        return self._call("step")

    def role(self, info: TensorInfo):
        return self._call("role", info)

    def averaged_by_default(self, info: TensorInfo) -> bool:
        return self._call("averaged_by_default", info)

    def extras(self):
        return self._call("extras")

    def close(self) -> None:
        """The pool owns the reader: ``ReaderPool.close`` closes it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __getattr__(self, attr: str):
        # format-specific attributes and methods (a TF reader's meta_file, an
        # HDF5 reader's datasets for its writer's template): methods run under
        # a lease of their own when called
        if attr.startswith("__") or attr in ("_pool", "source"):
            raise AttributeError(attr)
        value = self._call("__getattribute__", attr)
        if callable(value) and getattr(value, "__self__", None) is not None:
            def call(*args):
                return self._call(attr, *args)
            return call
        return value


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


def _averaged(reader: Reader, info: TensorInfo, opts: Options, inc, exc, is_shadow) -> bool:
    if not dtypes.is_float(info.dtype):
        return False
    if exc and any(r.search(info.name) for r in exc):
        return False
    if inc and any(r.search(info.name) for r in inc):
        return True
    if info.dtype not in dtypes.AVERAGED_BY_DEFAULT and opts.dtype == "keep":
        return False  # float8: copied unless --dtype says what to write
    if is_shadow(info.name, opts.suffix):
        return False  # an existing moving-average shadow (x/--suffix) is copied, not averaged again
    return reader.averaged_by_default(info)


def _compile(patterns: list[str], flag: str):
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
    seen: dict[int, str] = {}
    for c in cks:
        if c.step is not None:
            if c.step in seen:
                raise EmaError(f"same step {c.step} as {seen[c.step]} (remove one, or use --order given)", path=c.path)
            seen[c.step] = c.path
    return cks, metas


def make_plan(inputs: list[str], opts: Options, *, out_format: str | None = None,
              pool: ReaderPool | None = None) -> Plan:
    opts.spec.validate()
    if opts.dtype not in dtypes.OUTPUT_CHOICES:
        raise UsageError(f"--dtype must be one of {', '.join(dtypes.OUTPUT_CHOICES)}")
    if opts.order not in ("step", "given"):
        raise UsageError("--order is 'step' or 'given'")
    inc, exc = _compile(opts.include, "--include"), _compile(opts.exclude, "--exclude")
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
    for c in cks:
        c.selected, c.weight = False, 0.0
    for i, w in zip(sel, weights):
        cks[i].selected, cks[i].weight = True, float(w)
    newest = len(cks) - 1

    # per tensor: averaged or copied, output dtype and name
    out_mod = formats.module(out_format) if out_format else None
    can_store = getattr(out_mod, "can_store", None) if out_mod is not None else None
    # signed weights (post-hoc EMA) must not mix statistics buffers: a variance could turn
    # negative; like EDM2, they come from the newest snapshot
    buffers_from_newest = bool(opts.series) or bool(np.any(weights < 0))
    from ema_cli.names import is_shadow

    tasks, skipped, buffers = [], [], []
    # one lease for the loop (not one per tensor: a header may list millions)
    with pool.lease(cks[newest].source) as reader:
        for name, info in metas[newest].items():
            avg = _averaged(reader, info, opts, inc, exc, is_shadow)
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
        from ema_cli import names

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

    shards = _shard(tasks, opts.max_shard_size)
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


def _shard(tasks: list[Task], max_size: int | None) -> list[list[str]]:
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


# --------------------------------------------------------------------------- compute


# the numeric kernel lives in ema_cli/kernel.py; these are the engine's thin calls


def _stage_buffer(dtype: np.dtype, block: int) -> np.ndarray:
    return kernel.stage_buffer(dtype, block)


def _narrowing(plan: Plan, task: Task, pairs) -> kernel.Narrowing | None:
    """The overflow guard for this tensor, or None when its sum cannot overflow
    the output dtype (the normal path: no extra work at all)."""
    return kernel.narrowing(task.out_name, task.out_dtype, task.info.dtype, plan.weights, plan.options.saturate,
                            plan.__dict__.setdefault("_can_overflow", {}))


def _block_sum(srcs, weights, out_flat: np.ndarray, check: bool, emit=None, narrow=None, *, task: Task | None = None):
    return kernel.block_sum(srcs, weights, out_flat, check, emit, narrow,
                            in_dtype=None if task is None else task.info.dtype,
                            out_dtype=None if task is None else task.out_dtype)


def compute_tensor(plan: Plan, task: Task, pool: ReaderPool, read=None) -> np.ndarray:
    """The output value of one tensor: a pure function of the plan.  ``read``
    (``read(source, name)``): readers leased for a batch of small tensors
    (``run_shard``); default, one lease per read from ``pool``."""
    cks = plan.checkpoints
    read = read or pool.read
    if task.action == "copy":
        arr = plan.overrides.get(task.name)
        if arr is None:
            arr = read(cks[plan.newest].source, task.name)
        if task.out_dtype != task.info.dtype:
            arr = dtypes.cast_rounded(arr, task.out_dtype)
        return arr
    pairs = [(cks[i], w) for i, w in zip(plan.selected, plan.weights) if w != 0.0]
    out = np.empty(task.info.shape, dtype=dtypes.to_numpy(task.out_dtype))
    check = not plan.options.allow_nonfinite
    spec = plan.options.spec
    if spec.tf_exact:
        sel = [cks[i] for i in plan.selected]
        arrs = [read(ck.source, task.name) for ck in sel]
        steps = np.array([ck.step or 0 for ck in sel])
        bad = kernel.tf_exact_replay(arrs, steps, spec.decay, spec.num_updates, out, check, _narrowing(plan, task, pairs))
    else:
        srcs = [np.asarray(read(ck.source, task.name)).reshape(-1) for ck, _ in pairs]
        bad = _block_sum(srcs, [w for _, w in pairs], out.reshape(-1), check, narrow=_narrowing(plan, task, pairs),
                         task=task)
    if bad is not None:
        _raise_nonfinite(pairs, task, read)
    return out


def _raise_nonfinite(pairs, task: Task, read):
    for ck, w in pairs:
        if not np.isfinite(read(ck.source, task.name)).all():
            raise EmaError(f"has NaN or Inf values (weight {w:.6g}); use --allow-nonfinite to average anyway",
                           path=ck.path, tensor=task.name)
    raise EmaError("the weighted sum is not finite (overflow)", tensor=task.name)


def _streams(plan: Plan, task: Task, writer) -> bool:
    """Whether the tensor is averaged block by block straight into the writer."""
    return (task.action == "average" and not plan.options.spec.tf_exact
            and dtypes.itemsize(task.out_dtype) * task.info.numel >= STREAM_MIN
            and hasattr(writer, "write_range"))


def stream_tensor(plan: Plan, task: Task, pool: ReaderPool, writer, hasher=None) -> None:
    """Average one tensor into ``writer.write_range`` chunk by chunk: the same
    values as ``compute_tensor``, but only a CHUNK-sized staging buffer per
    thread is held, whatever the tensor's size.  ``hasher`` (hashlib) is fed the
    output bytes in order (the same digest as ``digest`` of the whole tensor)."""
    cks = plan.checkpoints
    pairs = [(cks[i], w) for i, w in zip(plan.selected, plan.weights) if w != 0.0]
    srcs = [np.asarray(pool.read(ck.source, task.name)).reshape(-1) for ck, _ in pairs]
    stage = _stage_buffer(dtypes.to_numpy(task.out_dtype), min(task.info.numel, BLOCK))
    write_range, name = writer.write_range, task.out_name
    # inputs whose reader can drop consumed mapped pages before the tensor is done
    # (in steps: each call costs a TLB shootdown; the rest goes in _release)
    releases = [ck.source for ck, _ in pairs]
    step = max(1, RELEASE_STEP // max(1, dtypes.itemsize(task.info.dtype)))
    released = 0

    def emit(start: int, part: np.ndarray) -> None:
        nonlocal released
        write_range(name, start, part)
        if hasher is not None:
            hasher.update(part.view(np.uint8))
        end = start + part.size
        if end - released >= step and end < task.info.numel:
            for src in releases:
                pool.release(src, task.name, released, end)
            released = end

    if _block_sum(srcs, [w for _, w in pairs], stage, not plan.options.allow_nonfinite, emit,
                  narrow=_narrowing(plan, task, pairs), task=task) is not None:
        _raise_nonfinite(pairs, task, pool.read)


def _release(plan: Plan, task: Task, pool: ReaderPool) -> None:
    """Tell the readers that support it that this tensor is done (safetensors
    drops its memory-mapped pages from the process: resident memory stays small)."""
    if task.info.nbytes < RELEASE_MIN:
        return  # (readers leave ranges this small alone)
    cks = plan.checkpoints
    used = plan.selected if task.action == "average" else [plan.newest]
    for i in used:
        pool.release(cks[i].source, task.name)


UNIT_BYTES = 4 << 20  # small tensors are computed in batches of up to this many input bytes ...
UNIT_TENSORS = 4096  # ... and this many tensors, each input's reader leased once per batch


def _units(plan: Plan, shard: list[str]) -> list[list[str]]:
    """The shard's tensors in work units: a tensor of at least ``UNIT_BYTES`` on
    its own, runs of smaller ones together (a header may list millions of tiny
    tensors: per-tensor costs, not bytes, would then dominate)."""
    units: list[list[str]] = []
    cur: list[str] = []
    size = 0
    task = plan.task
    for name in shard:
        nb = task(name).info.nbytes
        if nb >= UNIT_BYTES:
            units.append([name])
            continue
        if cur and (size + nb > UNIT_BYTES or len(cur) >= UNIT_TENSORS):
            units.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nb
    if cur:
        units.append(cur)
    return units


def _groups(plan: Plan, names: list[str]) -> list[list[str]]:
    """Consecutive tensors of a unit with the same action and dtypes."""
    out: list[list[str]] = []
    key = None
    for name in names:
        t = plan.task(name)
        k = (t.action, t.info.dtype, t.out_dtype)
        if k != key:
            out.append([])
            key = k
        out[-1].append(name)
    return out


def _batchable(plan: Plan, writer, name: str) -> bool:
    """Whether a group of small averaged tensors (like ``name``) can be summed as
    one flat array: the kernel works element by element, so the values are the
    same bits as tensor by tensor.  Not for ``--tf-exact`` (its own recurrence),
    nor where the sum could overflow the output dtype (the error names one
    tensor), nor for tensors streamed to the writer."""
    task = plan.task(name)
    if task.action != "average" or plan.options.spec.tf_exact or _streams(plan, task, writer):
        return False
    pairs = [(plan.checkpoints[i], w) for i, w in zip(plan.selected, plan.weights) if w != 0.0]
    return _narrowing(plan, task, pairs) is None


def _batch(target: "Target", names: list[str], read, read_flat) -> None:
    """Average a group of small tensors of one dtype in one kernel call over their
    concatenation, then write each (per-tensor costs dominate tiny tensors)."""
    plan, writer, sums = target.plan, target.writer, target.checksums
    cks = plan.checkpoints
    pairs = [(cks[i], w) for i, w in zip(plan.selected, plan.weights) if w != 0.0]
    tasks = [plan.task(n) for n in names]
    in_names = [t.name for t in tasks]
    srcs = [read_flat(ck.source, in_names) for ck, _ in pairs]
    out = np.empty(srcs[0].size, dtype=dtypes.to_numpy(tasks[0].out_dtype))
    if _block_sum(srcs, [w for _, w in pairs], out, not plan.options.allow_nonfinite, task=tasks[0]) is not None:
        for t in tasks:  # which tensor: compute_tensor raises the error naming it
            compute_tensor(plan, t, None, read)
        raise EmaError("internal: a non-finite sum not found again", tensor=names[0])
    pos, items = 0, []
    for t in tasks:
        n = t.info.numel
        arr = out[pos:pos + n].reshape(t.info.shape)
        pos += n
        items.append((t.out_name, arr))
        if sums is not None:
            sums[t.out_name] = digest(arr)
    writer.write_many(items)


@dataclass
class Target:
    """One output of a run: its plan (the weights), its writer, its digests."""

    plan: Plan
    writer: object
    checksums: dict | None = None


def run_shard(plan: Plan | list[Target], shard: list[str], pool: ReaderPool, writer=None, *,
              threads: int = 1, on_tensor: Callable[[Task], None] | None = None,
              checksums: dict | None = None) -> None:
    """Compute and write one output shard (a list of output names).  With
    ``checksums``, record each written tensor's digest for ``--verify``.

    ``plan`` may instead be a list of targets over the same inputs and tensors
    (post-hoc EMA of several widths): each tensor is then computed for every
    target while its input data is in memory, so the inputs are read once.

    Work goes in units (``_units``): for a batch of small tensors, every input
    the batch reads is leased once (when the pool may hold them all open)."""
    targets = plan if isinstance(plan, list) else [Target(plan, writer, checksums)]
    first = targets[0].plan
    cks = first.checkpoints
    used = sorted({first.newest, *(i for t in targets for i, w in zip(t.plan.selected, t.plan.weights) if w != 0.0)})
    sources = [cks[i].source for i in used]
    # lease them all for a batch only if that leaves the pool room (ulimit -n, thousands of inputs)
    lease_all = len(sources) * max(1, threads) <= max(1, pool.max_open // 2)

    def one(name: str, read) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are reported as errors, not warnings
            for t in targets:
                _one(t, name, read)
        task = first.task(name)
        for t in targets:
            _release(t.plan, task, pool)
        if on_tensor is not None:
            on_tensor(task)

    def _one(target: Target, name: str, read) -> None:
        plan, writer, sums = target.plan, target.writer, target.checksums
        task = plan.task(name)
        if _streams(plan, task, writer):
            import hashlib

            hasher = hashlib.blake2b(digest_size=16) if sums is not None else None
            stream_tensor(plan, task, pool, writer, hasher)
            if hasher is not None:
                sums[name] = hasher.hexdigest()
        else:
            arr = compute_tensor(plan, task, pool, read)
            writer.write(name, arr)
            if sums is not None:
                sums[name] = digest(arr)
            del arr

    def unit(names: list[str]) -> None:
        if len(names) == 1 or not lease_all:
            for name in names:
                one(name, None)
            return
        with contextlib.ExitStack() as stack:
            readers = {src.path: stack.enter_context(pool.lease(src)) for src in sources}

            def read(source: Source, name: str):
                return readers[source.path].read(name)

            def read_flat(source: Source, names: list[str]):
                return readers[source.path].read_flat(names)

            for group in _groups(first, names):
                if len(group) > 1 and all(_batchable(t.plan, t.writer, group[0]) for t in targets):
                    with np.errstate(invalid="ignore", over="ignore"):
                        for t in targets:
                            _batch(t, group, read, read_flat)
                    if on_tensor is not None:
                        for name in group:
                            on_tensor(first.task(name))
                else:
                    for name in group:
                        one(name, read)

    units = _units(first, shard)
    if threads <= 1:
        for u in units:
            unit(u)
        return
    # bounded look-ahead: at most 2 units per thread in flight
    with ThreadPoolExecutor(max_workers=threads) as ex:
        pending = set()
        for u in units:
            pending.add(ex.submit(unit, u))
            if len(pending) >= 2 * threads:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    f.result()
        done, _ = wait(pending, return_when=FIRST_EXCEPTION)
        for f in done:
            f.result()
        for f in pending:
            f.result()


def digest(arr) -> str:
    """A checksum of a tensor's values (bytes for strings) for ``--verify``."""
    import hashlib

    a = np.asarray(arr)
    h = hashlib.blake2b(digest_size=16)
    if a.dtype.kind == "O":
        for v in a.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    else:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def default_threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@dataclass
class Result:
    plan: Plan
    output: str
    format: str
    files: list[str]
    timings: dict[str, float]
    bytes_written: int
    checksums: dict[str, str] | None = None


def run(plan: Plan, output: str, out_format: str | None, *, force: bool = False, pool: ReaderPool | None = None,
        on_tensor: Callable[[Task], None] | None = None, timings: dict | None = None,
        checksums: bool = False, verify: bool = False) -> Result:
    """Write the averaged checkpoint atomically to ``output``: a file (or TF
    prefix), or a directory (``formats.output_directory``: ``-o DIR/``, an
    existing directory, a name without suffix, HF shards), staged as a whole
    with the loader files of the newest input's directory.  ``out_format`` None:
    a directory in the inputs' format."""
    return run_many([plan], [output], out_format, force=force, pool=pool, on_tensor=on_tensor,
                    timings=timings, checksums=checksums, verify=verify)[0]


@dataclass
class _Output:
    """An output being written: where it is staged, its writer, what else goes in."""

    output: str
    format: str
    staged: object
    outdir: object = None
    copies: list = field(default_factory=list)
    writer: object = None
    write_path: str = ""


def _open_output(plan: Plan, output: str, out_format: str | None, *, force: bool, pool: ReaderPool,
                 leases: contextlib.ExitStack) -> _Output:
    sharded = len(plan.shards) > 1
    newest = plan.checkpoints[plan.newest].source
    outdir = formats.output_directory(output, out_format, [c.source for c in plan.checkpoints], newest,
                                      shards=len(plan.shards), max_shard_size=plan.options.max_shard_size)
    if outdir is not None:
        out_format = outdir.format
    elif out_format is None:
        raise EmaError("internal: no output format", path=output)
    mod = formats.module(out_format)
    _refuse_input_as_output(plan, output, directory=outdir is not None)
    copies: list[str] = []
    if outdir is not None:
        check_target(outdir.directory, force=force, is_dir=True)
        copies, notes = formats.directory_extras(outdir, newest)
        for note in notes:
            warn(note)
        staged = Staged(outdir.directory, is_dir=True, force=force)
        write_path = os.path.join(staged.path, outdir.name) if outdir.name else staged.path
    elif hasattr(mod, "make_staging"):
        staged = mod.make_staging(output, sharded=sharded, force=force)
        write_path = staged.path
    else:
        check_target(output, force=force, is_dir=False)
        staged = Staged(output, is_dir=False, force=force)
        write_path = staged.path
    out = _Output(output, out_format, staged, outdir, copies, write_path=write_path)
    try:
        # the writer keeps the newest input as its layout template for the whole run:
        # the format's own reader, leased so the pool never closes it meanwhile
        template = leases.enter_context(pool.lease(newest))
        metadata = dict(template.metadata())
        recipe = plan.describe()
        if recipe is not None:  # None (rename): the values are unchanged, so is the newest input's metadata
            metadata["ema_avg"] = json.dumps(recipe, separators=(",", ":"))
        out.writer = mod.Writer(write_path, plan.shard_infos(), metadata,
                                template=template if plan.use_template else None)
    except BaseException:
        staged.discard()
        raise
    return out


def run_many(plans: list[Plan], outputs: list[str], out_format: str | None, *, force: bool = False,
             pool: ReaderPool | None = None, on_tensor: Callable[[Task], None] | None = None,
             timings: dict | None = None, checksums: bool = False, verify: bool = False) -> list[Result]:
    """Write several outputs whose plans share inputs and tensors (only the
    weights differ) in one pass over the inputs; each is committed atomically
    once every output is complete (a failure before that leaves none of them).
    ``verify``: each staged output is reopened and checked against the digests
    computed on the way (``ema_cli.verify``) before anything is committed."""
    pool = pool or ReaderPool()
    t0 = time.perf_counter()
    first = plans[0]
    for p in plans[1:]:
        if p.shards != first.shards or [t.action for t in p.tasks] != [t.action for t in first.tasks]:
            raise EmaError("internal: outputs of one pass must share their tensors")
    opened: list[_Output] = []
    leases = contextlib.ExitStack()
    try:
        for plan, output in zip(plans, outputs):
            opened.append(_open_output(plan, output, out_format, force=force, pool=pool, leases=leases))
        threads = first.options.threads or default_threads()
        targets = [Target(p, o.writer, {} if checksums or verify else None) for p, o in zip(plans, opened)]
        for shard in first.shards:
            run_shard(targets, shard, pool, threads=threads, on_tensor=on_tensor)
        for o in opened:
            o.writer.close()
            o.writer = None
            if o.outdir is not None:
                formats.finish_directory(o.outdir, o.staged.path, o.copies)
        verify_s = 0.0
        if verify:
            from ema_cli import verify as verify_mod

            for o, target in zip(opened, targets):
                staged_out = o.staged.path if o.outdir is not None else o.write_path
                verify_s += verify_mod.verify(target.plan, staged_out, o.format, target.checksums, output=o.output)
        for o in opened:
            o.staged.commit()
    except BaseException:
        for o in opened:
            if o.writer is not None:
                o.writer.abort()
            o.staged.discard()
        raise
    finally:
        leases.close()
    t = dict(timings or {})
    t["write_s"] = time.perf_counter() - t0
    if verify:
        t["verify_s"] = verify_s
    results = []
    for plan, o, target in zip(plans, opened, targets):
        nbytes = sum(dtypes.itemsize(task.out_dtype) * task.info.numel for task in plan.tasks)
        files = getattr(o.staged, "final_files", None) or [o.output]
        results.append(Result(plan, o.output, o.format, files, dict(t), nbytes, target.checksums))
    return results


def _refuse_input_as_output(plan: Plan, output: str, *, directory: bool = False) -> None:
    """An output that is one of the inputs is refused; so is a directory output
    that contains an input at any depth (replacing it would delete the input)."""
    out = os.path.realpath(output)
    for c in plan.checkpoints:
        for f in (c.source.path, *c.source.files):
            real = os.path.realpath(f)
            if real == out or os.path.realpath(os.path.dirname(f)) == out:
                raise EmaError("output path is one of the inputs", path=output)
            if directory and real.startswith(out.rstrip(os.sep) + os.sep):
                raise EmaError(f"output directory contains an input ({f}); choose another directory", path=output)
