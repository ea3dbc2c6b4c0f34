"""The run: inputs -> plan -> tasks -> executor -> commit.

``make_plan`` (``ema_cli.planning``) reads the inputs' headers and decides
everything; ``run`` / ``run_many`` stage each output (``ema_cli.commit``),
cut the work into shard tasks (``ema_cli.execute``), hand them to an
executor (threads in this process, or a Dask cluster) and commit the outputs
atomically once every task has reported back.  A failure anywhere before the
commit leaves nothing at any output path.

This module is also the library's stable entry point for the run: the names
below (``Options``, ``make_plan``, ``run``, ``run_many``, ``ReaderPool``,
``Plan``, ``Result``, ``parse_size``, ``reader_options``) keep their
signatures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ema_cli import dtypes, formats, interrupts, storage
from ema_cli.commit import Prepared, prepare
from ema_cli.errors import EmaError, UsageError
from ema_cli.execute import ShardResult, ShardTask, ThreadExecutor, default_threads, digest, run_shard
from ema_cli.planning import (Checkpoint, Options, Plan, Task, make_plan, parse_size, reader_options, shard_tasks,
                          split_shards, step_from_name)
from ema_cli.readers import ReaderPool, fd_limit_error

__all__ = [
    "Checkpoint", "Options", "Plan", "ReaderPool", "Result", "Task", "default_threads", "digest", "fd_limit_error",
    "make_plan", "parse_size", "reader_options", "run", "run_many", "run_shard", "shard_tasks", "split_shards", "step_from_name",
]


@dataclass
class Result:
    plan: Plan
    output: str
    format: str
    files: list[str]
    timings: dict[str, float]
    bytes_written: int
    checksums: dict[str, str] | None = None
    tasks: list[dict] = field(default_factory=list)  # per shard task: shard, worker, bytes, seconds
    executor: str = "threads"
    notes: list[str] = field(default_factory=list)


def run(plan: Plan, output: str, out_format: str | None, *, force: bool = False, pool: ReaderPool | None = None,
        on_tensor: Callable[[Task], None] | None = None, timings: dict | None = None,
        checksums: bool = False, verify: bool = False, executor=None) -> Result:
    """Write the averaged checkpoint atomically to ``output``: a file (or TF
    prefix), or a directory (``formats.output_directory``: ``-o DIR/``, an
    existing directory, a name without suffix, HF shards), staged as a whole
    with the loader files of the newest input's directory.  ``out_format`` None:
    a directory in the inputs' format.  ``executor``: where the shard tasks run
    (default: threads in this process)."""
    return run_many([plan], [output], out_format, force=force, pool=pool, on_tensor=on_tensor,
                    timings=timings, checksums=checksums, verify=verify, executor=executor)[0]


def run_many(plans: list[Plan], outputs: list[str], out_format: str | None, *, force: bool = False,
             pool: ReaderPool | None = None, on_tensor: Callable[[Task], None] | None = None,
             timings: dict | None = None, checksums: bool = False, verify: bool = False,
             executor=None, on_task: Callable[[ShardTask, ShardResult], None] | None = None) -> list[Result]:
    """Write several outputs whose plans share inputs and tensors (only the
    weights differ) in one pass over the inputs; each is committed atomically
    once every output is complete (a failure before that leaves none of them).
    ``verify``: each staged output is reopened and checked against the digests
    computed on the way (``ema_cli.verify``) before anything is committed."""
    pool = pool or ReaderPool()
    executor = executor or ThreadExecutor(pool)
    t0 = time.perf_counter()
    first = plans[0]
    for p in plans[1:]:
        if p.shards != first.shards or [t.action for t in p.tasks] != [t.action for t in first.tasks]:
            raise EmaError("internal: outputs of one pass must share their tensors")
    options = storage.options_text(first.options.storage_options)
    distributed = executor.name != "threads"
    prepared: list[Prepared] = []
    try:
        for plan, output in zip(plans, outputs):
            prepared.append(prepare(plan, output, out_format, force=force, pool=pool, storage_options=options))
        if distributed and not all(p.shard_files for p in prepared):
            raise UsageError(f"{outputs[0]}: a Dask run writes each output shard on a worker: give "
                             "--max-shard-size, or a directory output (split into one shard per worker) "
                             "in a format with shard files (safetensors)")
        threads = first.options.threads or (default_threads() if not distributed else 1)
        split = prepared[0].shard_files
        indices = list(range(len(first.shards))) if split else [None]
        tasks = [ShardTask(tuple(plans), tuple(p.spec for p in prepared), i, threads,
                           checksums=checksums or verify, digest=distributed) for i in indices]
        results = executor.run(tasks, on_tensor=on_tensor, on_result=on_task)
        if distributed:
            missing = [t.key for t, r in zip(tasks, results) if r is None or len(r.digests) != len(plans)]
            if missing:
                raise EmaError(f"internal: no digest from task(s) {', '.join(missing[:5])}; nothing committed",
                               path=outputs[0])
        for k, p in enumerate(prepared):
            p.finish(results, k)
        sums = [_merged(results, k) if (checksums or verify) else None for k in range(len(plans))]
        verify_s = 0.0
        if verify:
            from ema_cli import verify as verify_mod

            for p, plan, s in zip(prepared, plans, sums):
                verify_s += verify_mod.verify(plan, p.staged_path, p.format, s, output=p.output, options=options)
        with interrupts.committing():  # every output or none, whatever signal arrives meanwhile
            for p in prepared:
                p.commit()
    except BaseException:
        for p in prepared:
            p.discard()
        raise
    t = dict(timings or {})
    t["write_s"] = time.perf_counter() - t0
    if verify:
        t["verify_s"] = verify_s
    out = []
    described = [r.describe() for r in results]
    for plan, p, s in zip(plans, prepared, sums):
        nbytes = sum(dtypes.itemsize(task.out_dtype) * task.info.numel for task in plan.tasks)
        out.append(Result(plan, p.output, p.format, p.final_files, dict(t), nbytes, s, described, executor.name))
    return out


def _merged(results: list[ShardResult], k: int) -> dict[str, str]:
    sums: dict[str, str] = {}
    for r in results:
        if r.checksums is not None:
            sums.update(r.checksums[k])
    return sums
