"""Tasks and executors: computing output shards from a plan.

A shard task (``ShardTask``: plans, output specs, a shard index) is a pure,
picklable description of work.  ``run_task`` opens its own readers (a
``ReaderPool`` of its own, unless the in-process executor lends its pool) and
its own writer for its own output file, computes every tensor of the shard
through the kernel, closes the writer and returns a small ``ShardResult``
(digests, bytes, seconds, where it ran).  No live object crosses a task
boundary, so the same task runs in this process (``ThreadExecutor``: tensors
in threads) or on a Dask worker (``DaskExecutor``).

Inside a task, ``run_shard`` computes a shard's tensors: each is a weighted
sum over the checkpoints, accumulated in float64 in cache-sized blocks and
rounded once (``ema_cli.kernel``), handed to the writer whole or streamed in
chunks (``Writer.write_range``); small tensors go in batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ema_cli import dtypes, formats, kernel, notices, storage
from ema_cli.errors import EmaError, UsageError
from ema_cli.formats.base import Source
from ema_cli.output import shown_path
from ema_cli.planning import Plan, Task
from ema_cli.readers import ReaderPool

BLOCK = kernel.BLOCK  # elements per float64 accumulation block (512 KiB; two of them stay in L2)
CHUNK = kernel.CHUNK  # bytes of rounded output a thread stages before handing them to a streaming writer
STREAM_MIN = 1 << 20  # averaged tensors of at least this many bytes are streamed to writers that write ranges
RELEASE_STEP = 16 << 20  # while streaming, consumed input pages are unmapped every this many bytes per input
RELEASE_MIN = 1 << 19  # tensors smaller than this are not released (a reader drops whole pages of >= 512 KiB)
# read-ahead (Reader.prefetch, see ReadAhead): one thread per shard asks for the input bytes
# in the order the workers read them, in pieces of PIECE bytes of every input in turn, at
# most AHEAD bytes ahead of what the workers have consumed.
AHEAD = 128 << 20
PIECE = 4 << 20
PREFETCH_MIN = 256 << 10  # smaller tensors are left to the kernel's own read-around


def _narrowing(plan: Plan, task: Task, pairs) -> kernel.Narrowing | None:
    """The overflow guard for this tensor, or None when its sum cannot overflow
    the output dtype (the normal path: no extra work at all)."""
    return kernel.narrowing(task.out_name, task.out_dtype, task.info.dtype, plan.weights, plan.options.saturate,
                            plan.__dict__.setdefault("_can_overflow", {}))


def _block_sum(srcs, weights, out_flat: np.ndarray, check: bool, emit=None, narrow=None, *, task: Task | None = None):
    """``kernel.block_sum`` with the task's canonical dtypes (arrays may hold raw bits)."""
    return kernel.block_sum(srcs, weights, out_flat, check, emit, narrow,
                            in_dtype=None if task is None else task.info.dtype,
                            out_dtype=None if task is None else task.out_dtype)


def for_writer(writer, arr, dtype: str):
    """``arr`` (a tensor of canonical dtype ``dtype``) as ``writer`` takes it: the
    one place where the engine's raw bits meet the writers.  The engine carries
    bfloat16 as its uint16 bits (``dtypes.storage_numpy``; the kernel's outputs,
    and the reads of readers with ``Reader.reads_bits``); a writer with
    ``Writer.writes_bits`` gets them as they are (ml_dtypes arrays from other
    readers viewed as bits), any other writer an ml_dtypes view of them, without
    a copy (which imports ml_dtypes: those formats' own libraries need it)."""
    if dtype not in dtypes.BITS:
        return arr
    return dtypes.as_storage(arr, dtype) if writer.writes_bits else dtypes.as_values(arr, dtype)


def compute_tensor(plan: Plan, task: Task, pool: ReaderPool, read=None) -> np.ndarray:
    """The output value of one tensor: a pure function of the plan.  ``read``
    (``read(source, name)``): readers leased for a batch of small tensors
    (``run_shard``); default, one lease per read from ``pool``.

    Averaged tensors come in ``dtypes.storage_numpy(task.out_dtype)`` (bfloat16
    as its uint16 bits); copies as read (bits or ml_dtypes' type, by the reader),
    or in the storage dtype when the copy changes dtype.  Hand the result to a
    writer through ``for_writer``."""
    cks = plan.checkpoints
    read = read or pool.read
    if task.action == "copy":
        arr = plan.overrides.get(task.name)
        if arr is not None:
            return arr  # (overrides hold output values, in the output dtype already)
        arr = read(cks[plan.newest].source, task.name)
        if task.out_dtype != task.info.dtype:
            arr = dtypes.cast_rounded(arr, task.out_dtype, src_dtype=task.info.dtype, storage=True)
        return arr
    pairs = [(cks[i], w) for i, w in zip(plan.selected, plan.weights) if w != 0.0]
    out = np.empty(task.info.shape, dtype=dtypes.storage_numpy(task.out_dtype))
    check = not plan.options.allow_nonfinite
    spec = plan.options.spec
    if spec.tf_exact:
        # TensorFlow's recurrence computes in the variables' own dtype: on values
        # (ml_dtypes' bfloat16 for bf16 variables), never on raw bits
        sel = [cks[i] for i in plan.selected]
        arrs = [dtypes.as_values(read(ck.source, task.name), task.info.dtype) for ck in sel]
        steps = np.array([ck.step or 0 for ck in sel])
        bad = kernel.tf_exact_replay(arrs, steps, spec.decay, spec.num_updates, dtypes.as_values(out, task.out_dtype),
                                     check, _narrowing(plan, task, pairs))
    else:
        srcs = [np.asarray(read(ck.source, task.name)).reshape(-1) for ck, _ in pairs]
        bad = _block_sum(srcs, [w for _, w in pairs], out.reshape(-1), check, narrow=_narrowing(plan, task, pairs),
                         task=task)
    if bad is not None:
        _raise_nonfinite(pairs, task, read)
    return out


def _raise_nonfinite(pairs, task: Task, read):
    for ck, w in pairs:
        if not dtypes.all_finite(read(ck.source, task.name), task.info.dtype):  # (values or raw bits)
            raise EmaError(f"has NaN or Inf values (weight {w:.6g}); use --allow-nonfinite to average anyway",
                           path=ck.path, tensor=task.name)
    raise EmaError("the weighted sum is not finite (overflow)", tensor=task.name)


def _streams(plan: Plan, task: Task, writer) -> bool:
    """Whether the tensor is averaged block by block straight into the writer."""
    return (task.action == "average" and not plan.options.spec.tf_exact
            and dtypes.itemsize(task.out_dtype) * task.info.numel >= STREAM_MIN
            and writer.writes_ranges)


def stream_tensor(plan: Plan, task: Task, pool: ReaderPool, writer, hasher=None, consumed=None) -> None:
    """Average one tensor into ``writer.write_range`` chunk by chunk: the same
    values as ``compute_tensor``, but only a CHUNK-sized staging buffer per
    thread is held, whatever the tensor's size.  ``hasher`` (hashlib) is fed the
    output bytes in order (the same digest as ``digest`` of the whole tensor).
    ``consumed`` (``ReadAhead.consumed``) is told the input bytes read so far."""
    cks = plan.checkpoints
    pairs = [(cks[i], w) for i, w in zip(plan.selected, plan.weights) if w != 0.0]
    srcs = [pool.read_stream(ck.source, task.name) for ck, _ in pairs]
    stage = kernel.stage_buffer(dtypes.storage_numpy(task.out_dtype), min(task.info.numel, BLOCK))
    write_range, name, out_dtype = writer.write_range, task.out_name, task.out_dtype
    # inputs whose reader can drop consumed mapped pages before the tensor is done
    # (in steps: each call costs a TLB shootdown; the rest goes in _release)
    releases = [ck.source for ck, _ in pairs]
    item = max(1, dtypes.itemsize(task.info.dtype))
    step = max(1, RELEASE_STEP // item)
    released = 0

    def emit(start: int, part: np.ndarray) -> None:
        nonlocal released
        write_range(name, start, for_writer(writer, part, out_dtype))
        if hasher is not None:
            hasher.update(part.view(np.uint8))
        end = start + part.size
        if consumed is not None:
            consumed(task.name, part.size * item * len(releases))
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


class ReadAhead:
    """Read-ahead for one shard: a thread that asks the readers (``Reader.prefetch``)
    for the shard's input bytes in the order the workers read them (unit by unit;
    a tensor piece by piece, every input's piece in turn, as the kernel's blocks
    go), never more than ``AHEAD`` bytes ahead of what they have consumed.

    From a cold disk the requests then stay in flight while the workers compute
    (on the page cache they are no-ops), are issued by a thread that does nothing
    else (an ``madvise`` may wait for room in the device queue: that wait is not a
    worker's), and come in the order the workers consume, so the disk sees a few
    sequential streams instead of one page fault after another across N inputs.
    Inputs whose reader does not read ahead are asked once."""

    def __init__(self, plan: Plan, units: list[list[str]], pool: ReaderPool, sources: list[Source]):
        self.plan, self.units, self.pool, self.sources = plan, units, pool, sources
        self.left: dict[str, int] = {}  # per tensor read ahead: its input bytes not consumed yet
        for u in units:
            for name in u:
                task = plan.task(name)
                if task.info.nbytes >= PREFETCH_MIN:
                    self.left[task.name] = task.info.nbytes * len(self._inputs(task))
        self.done = 0  # bytes the workers have consumed
        self.stop = False
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=notices.bound(self._run), name="ema-avg-read-ahead", daemon=True)
        if self.left:
            self.thread.start()

    def _inputs(self, task: Task) -> list[Source]:
        return self.sources if task.action == "average" else [self.plan.checkpoints[self.plan.newest].source]

    def _pieces(self):
        """(source, name, first, last, bytes) in the order the workers read them."""
        for u in self.units:
            for name in u:
                task = self.plan.task(name)
                if task.name not in self.left:
                    continue
                srcs, numel = self._inputs(task), task.info.numel
                item = max(1, dtypes.itemsize(task.info.dtype))
                step = max(1, PIECE // item)
                for a in range(0, numel, step):
                    b = min(a + step, numel)
                    for src in srcs:
                        yield src, task.name, a, b, (b - a) * item

    def consumed(self, name: str, nbytes: int | None = None) -> None:
        """The workers have read ``nbytes`` more of tensor ``name`` (None: all the rest)."""
        with self.cv:
            left = self.left.get(name, 0)
            n = left if nbytes is None else min(left, nbytes)
            if n:
                self.left[name] = left - n
                self.done += n
                self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        asked, skip = 0, set()
        try:
            for src, name, a, b, nbytes in self._pieces():
                with self.cv:
                    while not self.stop and asked - self.done > AHEAD:
                        self.cv.wait()
                    if self.stop:
                        return
                asked += nbytes
                if src.path not in skip and not self.pool.prefetch(src, name, a, b):
                    skip.add(src.path)
                    if len(skip) == len(self.sources):
                        return  # (none of these readers reads ahead)
        except Exception:  # a hint only: a reader that fails fails for its worker too, with its error line
            return


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
    out = np.empty(srcs[0].size, dtype=dtypes.storage_numpy(tasks[0].out_dtype))
    if _block_sum(srcs, [w for _, w in pairs], out, not plan.options.allow_nonfinite, task=tasks[0]) is not None:
        for t in tasks:  # which tensor: compute_tensor raises the error naming it
            compute_tensor(plan, t, None, read)
        raise EmaError("internal: a non-finite sum not found again", tensor=names[0])
    pos, items = 0, []
    for t in tasks:
        n = t.info.numel
        arr = out[pos:pos + n].reshape(t.info.shape)
        pos += n
        items.append((t.out_name, for_writer(writer, arr, t.out_dtype)))
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

    units = _units(first, shard)
    ahead = ReadAhead(first, units, pool, sources)
    consumed = ahead.consumed if ahead.left else None

    def one(name: str, read) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are reported as errors, not warnings
            for t in targets:
                _one(t, name, read)
        task = first.task(name)
        if consumed is not None:
            consumed(task.name)
        for t in targets:
            _release(t.plan, task, pool)
        if on_tensor is not None:
            on_tensor(task)

    def _one(target: Target, name: str, read) -> None:
        plan, writer, sums = target.plan, target.writer, target.checksums
        task = plan.task(name)
        if _streams(plan, task, writer):
            hasher = _blake2b() if sums is not None else None
            stream_tensor(plan, task, pool, writer, hasher, consumed)
            if hasher is not None:
                sums[name] = hasher.hexdigest()
        else:
            arr = compute_tensor(plan, task, pool, read)
            writer.write(name, for_writer(writer, arr, task.out_dtype))
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
                    for name in group:
                        if consumed is not None:
                            consumed(first.task(name).name)
                        if on_tensor is not None:
                            on_tensor(first.task(name))
                else:
                    for name in group:
                        one(name, read)

    try:
        if threads <= 1 or len(units) <= 1:  # one unit (a small model): no pool
            for u in units:
                unit(u)
            return
        # imported here: a one-thread run (a small model) skips concurrent.futures and logging (8 ms)
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        # bounded look-ahead: at most 2 units per thread in flight
        with ThreadPoolExecutor(max_workers=threads) as ex:
            pending = set()
            for u in units:
                pending.add(ex.submit(notices.bound(unit), u))  # its warnings go where the caller's go
                if len(pending) >= 2 * threads:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in done:
                        f.result()
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()
            for f in pending:
                f.result()
    finally:
        ahead.close()


def _blake2b():
    """A 16-byte BLAKE2b hasher (hashlib imported here: only --verify needs it, 4 ms of start-up)."""
    import hashlib

    return hashlib.blake2b(digest_size=16)


def digest(arr) -> str:
    """A checksum of a tensor's values (bytes for strings) for ``--verify``."""
    a = np.asarray(arr)
    h = _blake2b()
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



# --------------------------------------------------------------------------- shard tasks


@dataclass(frozen=True)
class OutputSpec:
    """One output as a task sees it: picklable, no live object.

    ``write_path`` is where the task's writer writes when the output is local
    (a staging file, prefix or directory made by ``ema_cli.commit``).  A
    remote output (``upload_to``: a staging prefix URL) is written by each task
    into a local temporary directory, then uploaded under that prefix; the
    commit moves it into place.  ``name`` is the writer's name inside
    ``write_path`` (``""``: ``write_path`` itself); ``directory``: the output is
    a directory, which the task finishes (``Format.finish_directory``) when it
    writes the whole output."""

    format: str
    write_path: str
    name: str = ""
    directory: bool = False
    metadata: tuple[tuple[str, str], ...] = ()
    upload_to: str | None = None
    storage_options: str = ""
    upload_for: str = ""  # the URL the task's local directory stands for (the output's directory), for messages


@dataclass(frozen=True)
class ShardTask:
    """``plans`` (outputs of one pass: same inputs and tensors, other weights)
    and their ``outputs``; ``shard``: the index of the output shard this task
    writes as a file of its own (formats with shard files), or None: every
    shard, through one writer (one task per output)."""

    plans: tuple[Plan, ...]
    outputs: tuple[OutputSpec, ...]
    shard: int | None
    threads: int = 1
    checksums: bool = False  # per-tensor digests back to the client (--verify)
    digest: bool = False  # a digest of the shard's values (the Dask commit waits for every one)

    @property
    def key(self) -> str:
        return "all" if self.shard is None else f"shard-{self.shard}"

    def shard_indices(self) -> list[int]:
        return list(range(len(self.plans[0].shards))) if self.shard is None else [self.shard]


@dataclass
class ShardResult:
    """What a task reports back: small (its files' digests; per-tensor
    checksums only with ``--verify``)."""

    shard: int | None
    worker: str
    bytes_read: int
    bytes_written: int
    seconds: float
    tensors: int
    digests: list[str] = field(default_factory=list)  # per output: one digest of the shard's tensors
    checksums: list[dict] | None = None  # per output: {tensor: digest} (--verify)
    files: list[list[str]] = field(default_factory=list)  # per output: what the task wrote (relative names)

    def describe(self) -> dict:
        return {"shard": self.shard, "worker": self.worker, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "seconds": round(self.seconds, 6), "tensors": self.tensors}


def _worker_name() -> str:
    """The Dask worker's address when the task runs on one, else host:pid
    (distributed is only looked at when it is loaded: a worker has it)."""
    import sys

    if "distributed" in sys.modules:
        try:
            return sys.modules["distributed"].get_worker().address
        except (AttributeError, ValueError):
            pass
    if hasattr(os, "uname"):  # the host name, without importing socket (4 ms of start-up)
        return f"{os.uname().nodename}:{os.getpid()}"
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _bytes_read(plan: Plan, names: list[str]) -> int:
    """The input bytes the shard's tensors read: each averaged tensor from every
    input with a non-zero weight, each copied one from the newest."""
    inputs = sum(1 for w in plan.weights if w != 0.0)
    total = 0
    task = plan.task
    for n in names:
        t = task(n)
        if t.action == "copy" and t.name in plan.overrides:
            continue
        total += t.info.nbytes * (inputs if t.action == "average" else 1)
    return total


def _open_writer(plan: Plan, spec: OutputSpec, shard: int | None, where: str, pool: ReaderPool,
                 stack: contextlib.ExitStack):
    fmt = formats.get(spec.format)
    meta = dict(spec.metadata)
    if shard is not None:
        infos = plan.shard_info(shard)  # (this shard's only: a task per shard)
        return fmt.open_shard(os.path.join(where, fmt.shard_names(len(plan.shards))[shard]), infos, meta)
    path = os.path.join(where, spec.name) if spec.name else where
    template = None
    if plan.use_template:  # the newest input's layout: leased for the writer's whole life
        template = stack.enter_context(pool.lease(plan.checkpoints[plan.newest].source))
    return fmt.writer(path, plan.shard_infos(), meta, template=template)


def run_task(task: ShardTask, pool: ReaderPool | None = None,
             on_tensor: Callable[[Task], None] | None = None) -> ShardResult:
    """Compute and write one shard task; see the module docstring.  ``pool``: the
    in-process executor's readers (else the task opens its own)."""
    t0 = time.perf_counter()
    own_pool = pool is None
    pool = pool or ReaderPool()
    tmp = None
    writers: list = []
    wheres: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            for spec in task.outputs:
                if spec.upload_to is not None:  # remote: written here, then uploaded to its staging prefix
                    import tempfile

                    tmp = tmp or tempfile.mkdtemp(prefix="ema-avg-task-")
                    where = os.path.join(tmp, str(len(wheres)))
                    os.mkdir(where)
                else:
                    where = spec.write_path
                wheres.append(where)
            try:
                for plan, spec, where in zip(task.plans, task.outputs, wheres):
                    writers.append(_open_writer(plan, spec, task.shard, where, pool, stack))
                sums = [{} if (task.checksums or task.digest) else None for _ in writers]
                targets = [Target(p, w, s) for p, w, s in zip(task.plans, writers, sums)]
                first = task.plans[0]
                for i in task.shard_indices():
                    run_shard(targets, first.shards[i], pool, threads=task.threads, on_tensor=on_tensor)
                for k, w in enumerate(writers):
                    w.close()
                    writers[k] = None
            except BaseException:
                for w in writers:
                    if w is not None:
                        w.abort()
                raise
        for plan, spec, where in zip(task.plans, task.outputs, wheres):
            if task.shard is None and spec.directory:
                formats.get(spec.format).finish_directory(where, spec.name)
        files = []
        for spec, where in zip(task.outputs, wheres):
            files.append(_task_files(spec, task, where))
            if spec.upload_to is not None:
                _upload(where, spec, files[-1])
        first = task.plans[0]
        names = [n for i in task.shard_indices() for n in first.shards[i]]
        digests = []
        for plan, s in zip(task.plans, sums):
            if s is None:
                continue
            h = _blake2b()
            for n in names:
                h.update(s[n].encode())
            digests.append(h.hexdigest())
        written = sum(dtypes.itemsize(first.task(n).out_dtype) * first.task(n).info.numel for n in names)
        return ShardResult(task.shard, _worker_name(), _bytes_read(first, names) * len(task.plans),
                           written * len(task.plans), time.perf_counter() - t0, len(names), digests,
                           sums if task.checksums else None, files)
    except EmaError as e:  # a writer names the file it writes: the user named the output behind it
        shown = _shown(str(e.path), task.outputs, wheres) if e.path else None
        if shown is not None and shown != str(e.path):
            raise e.naming(shown) from None
        raise
    except OSError as e:
        if isinstance(e.filename, str):
            e.filename = _shown(e.filename, task.outputs, wheres)
        raise
    finally:
        if own_pool:
            pool.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _shown(path: str, specs, wheres: list[str]) -> str:
    """The output the user named behind a path a task writes: a local staging
    path (``output.shown_path``), or a file in the local directory of a remote
    output's task (the output's URL)."""
    for spec, where in zip(specs, wheres):
        if spec.upload_to is None or not spec.upload_for:
            continue
        if path == where or path.startswith(where + os.sep):  # the task's local directory
            rel = os.path.relpath(path, where)
            return spec.upload_for if rel == "." else storage.join(spec.upload_for, *rel.split(os.sep))
        prefix = spec.upload_to.rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):  # the staging prefix in the store (an upload)
            rel = path[len(prefix):].lstrip("/")
            return storage.join(spec.upload_for, rel) if rel else spec.upload_for
    return shown_path(path)


def _task_files(spec: OutputSpec, task: ShardTask, where: str) -> list[str]:
    """The files a remote output's task wrote, relative to its local directory."""
    if spec.upload_to is None:
        return []
    if task.shard is not None:
        fmt = formats.get(spec.format)
        return [fmt.shard_names(len(task.plans[0].shards))[task.shard]]
    return sorted(os.path.relpath(os.path.join(r, f), where) for r, _d, fs in os.walk(where) for f in fs)


def _upload(base: str, spec: OutputSpec, files: list[str]) -> None:
    """Put a task's files under its output's staging prefix."""
    fs, prefix = storage.filesystem(spec.upload_to, spec.storage_options)
    for f in files:
        try:
            fs.put_file(os.path.join(base, f), f"{prefix.rstrip('/')}/{f}")
        except Exception as e:  # noqa: BLE001 - the back-end's own errors too
            raise storage.remote_error(e, storage.join(spec.upload_to, f), "cannot upload") from None


# --------------------------------------------------------------------------- executors


class ThreadExecutor:
    """Runs shard tasks in this process, one after the other, each with its
    tensors in ``task.threads`` threads; readers come from one shared pool
    (the plan's: headers are not parsed twice)."""

    name = "threads"

    def __init__(self, pool: ReaderPool | None = None):
        self.pool = pool or ReaderPool()

    def run(self, tasks: list[ShardTask], *, on_tensor=None, on_result=None) -> list[ShardResult]:
        results = []
        for t in tasks:
            r = run_task(t, self.pool, on_tensor)
            if on_result is not None:
                on_result(t, r)
            results.append(r)
        return results


def _run_with_plans(plans: tuple, task: ShardTask) -> ShardResult:
    """A Dask task: the scattered plans joined to the task that came without them."""
    return run_task(dataclasses.replace(task, plans=tuple(plans)))


class DaskExecutor:
    """Runs shard tasks on a Dask cluster: ``local:N`` starts a ``LocalCluster``
    of N worker processes (closed with the executor), anything else is the
    address of a running scheduler (``tcp://scheduler:8786``).

    Each task reads its shard's tensors from storage on the worker, writes its
    own output shard to the staging location and returns its ``ShardResult``.
    Dask reruns a task whose worker died (``retries`` more times for a task
    that raised); the run fails cleanly, committing nothing, when a task still
    fails.  Workers need ema-avg installed and the inputs and the staging
    location reachable (object storage, or a shared file system)."""

    name = "dask"

    def __init__(self, address: str, *, retries: int = 2):
        try:
            import distributed
        except ImportError:
            raise EmaError("--dask needs Dask distributed: pip install 'ema-avg[dask]'") from None
        import logging

        for name in ("distributed", "distributed.worker", "distributed.nanny", "distributed.scheduler",
                     "distributed.core", "distributed.comm"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self._d = distributed
        self.address = address
        self.retries = retries
        self.cluster = None
        try:
            if address.startswith("local:"):
                try:
                    n = int(address[len("local:"):])
                except ValueError:
                    n = 0
                if n < 1:
                    raise UsageError(f"--dask local:N takes a number of workers >= 1 (got {address!r})")
                self.cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                        dashboard_address=None, silence_logs=logging.ERROR)
                self.client = distributed.Client(self.cluster)
            else:
                self.client = distributed.Client(address, timeout="30s")
        except (OSError, TimeoutError) as e:
            self.close()
            raise EmaError(f"cannot reach the Dask scheduler: {e}", path=address) from None

    def worker_count(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def run(self, tasks: list[ShardTask], *, on_tensor=None, on_result=None) -> list[ShardResult]:
        from concurrent.futures import CancelledError

        from ema_cli.output import token as new_token

        d = self._d
        token = new_token()
        # the plans go to the cluster once, to every worker (a worker that dies leaves the others'
        # copies), not pickled into each task: a plan holds a Task per tensor
        [plans] = self.client.scatter([tasks[0].plans], broadcast=True, hash=False)
        futures = {self.client.submit(_run_with_plans, plans, dataclasses.replace(t, plans=()),
                                      key=f"ema-avg-{token}-{t.key}", pure=False, retries=self.retries): t
                   for t in tasks}
        results: dict[str, ShardResult] = {}
        try:
            for fut in d.as_completed(list(futures)):
                t = futures[fut]
                try:
                    r = fut.result()
                except EmaError:
                    raise
                except d.KilledWorker:
                    raise EmaError(f"{t.key}: the Dask workers running it died (tried on several); "
                                   "nothing was committed") from None
                except CancelledError as e:
                    raise EmaError(f"{t.key}: cancelled on the Dask cluster ({e}); nothing was committed") from None
                except Exception as e:
                    raise EmaError(f"{t.key} failed on a Dask worker: {type(e).__name__}: {e}") from None
                results[t.key] = r
                if on_tensor is not None:
                    first = t.plans[0]
                    for i in t.shard_indices():
                        for n in first.shards[i]:
                            on_tensor(first.task(n))
                if on_result is not None:
                    on_result(t, r)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return [results[t.key] for t in tasks]

    def close(self) -> None:
        for obj in (getattr(self, "client", None), self.cluster):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # noqa: BLE001 - closing a cluster that is already gone
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def executor_for(address: str | None, pool: ReaderPool):
    """``--dask ADDRESS``: a DaskExecutor; None: threads in this process."""
    return DaskExecutor(address) if address else ThreadExecutor(pool)
