#!/usr/bin/env python
"""Benchmark: inputs not in the page cache (cold cache) against ``cat``.

Writes N safetensors checkpoints of SIZE MiB float32 (``bench_average``'s
data), then, before every run of every case, evicts them from the page cache
with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (after an ``fsync``, so no dirty
page stays) and times, as processes, on the same files in one run:

  (a) ``ema-avg <files> -o out.safetensors --force --quiet`` (the mean), the
      output on the same disk as the inputs
  (b) the read floor: ``cat <files> > /dev/null``
  (c) the torch peer: ``safe_open(framework="pt")``, a float32 accumulator
      per tensor (``acc.add_(t, alpha=w)``), ``save_file``
  (d) the same as (a) with the output on ``/dev/shm`` (tmpfs): the inputs'
      reads alone on the disk, what (b) is the floor of
  (e) the job's disk floor: (b) while ``dd conv=fsync`` writes the output's
      size to the same disk, what (a) is the floor of

The output file is deleted (and everything synced) before each run, so no
run pays for the previous one's writeback.  Each eviction is checked by the
drop of ``Cached`` in ``/proc/meminfo``, printed as a fraction of the inputs'
size (about 1.0: they were all in the cache, and left it).

    python bench/bench_cold.py [--size-mb 256] [--n 8] [--reps 5] [--ema CMD] [--keep]

Target (issue 15): ema-avg reads at >= 0.9x ``cat``'s throughput: (d) <= (b) / 0.9,
and with its output on the same disk (a) <= (e) / 0.9.  This machine's disk is
shared and its speed drifts from minute to minute, so every ratio is the
median of the per-repetition ratios (the cases of one repetition run back to
back), beside the ratio of the medians.  Figures go to bench/out/results-cold.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_average import (EMA, PY, TENSORS, TORCH_PEER, cpu_model, ema_python, make_checkpoints,  # noqa: E402
                           run_cases, versions)



def cached_kb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return 0


def evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache (clean pages: they were synced)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of every case; medians reported (default 5)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--dir", default=str(HERE / "out"))
    ap.add_argument("--ema", default=EMA, help="the ema-avg command (split like a shell line)")
    ap.add_argument("--torch-python", default=PY, help="the Python that has torch, for the peer")
    args = ap.parse_args()

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    ema_cmd = shlex.split(args.ema)
    vers, cpu, load0 = versions(ema_python(ema_cmd)), cpu_model(), os.getloadavg()
    print(f"versions: {json.dumps(vers)}\nCPU: {cpu}, {os.cpu_count()} cores; load {load0}", file=sys.stderr)
    data = out / f"data-{args.n}x{args.size_mb}mb"
    paths = make_checkpoints(data, args.n, args.size_mb, TENSORS)
    total = sum(os.path.getsize(p) for p in paths)
    work = Path(tempfile.mkdtemp(prefix="run-cold-", dir=out))
    avg, peer, dd = work / "avg.safetensors", work / "torch.safetensors", work / "dd.bin"
    shm = Path(tempfile.mkdtemp(prefix="ema-avg-bench-", dir="/dev/shm")) if os.path.isdir("/dev/shm") else work
    avg_shm = shm / "avg.safetensors"
    out_mb = -(-total // args.n // (1 << 20))  # the output's size, MiB
    cases = {
        "(a) ema-avg mean": [*ema_cmd, *paths, "-o", str(avg), "--force", "--quiet"],
        "(b) cat > /dev/null": ["sh", "-c", 'cat "$@" > /dev/null', "cat", *paths],
        "(c) torch peer": [args.torch_python, "-c", TORCH_PEER, str(peer), *paths],
        "(d) ema-avg, out tmpfs": [*ema_cmd, *paths, "-o", str(avg_shm), "--force", "--quiet"],
        "(e) cat + dd out size": ["sh", "-c", f'cat "$@" > /dev/null & dd if=/dev/zero of={shlex.quote(str(dd))} '
                                  f'bs=1M count={out_mb} conv=fsync status=none; wait', "cat", *paths],
    }
    evicted: list[float] = []  # per run: the drop of Cached, as a fraction of the inputs' size

    def cold():
        for f in (avg, peer, dd, avg_shm):
            f.unlink(missing_ok=True)
        os.sync()
        before = cached_kb()
        evict(paths)
        evicted.append((before - cached_kb()) * 1024 / total)
        time.sleep(0.2)

    res = run_cases(cases, args.reps, before=cold)
    load1 = os.getloadavg()
    print(f"  evicted {min(evicted):.2f}-{max(evicted):.2f} of the inputs' size before the runs", file=sys.stderr)
    med = {k: v["median"] for k, v in res.items()}
    names = list(cases)
    a, b, c, d, e = (med[k]["wall_s"] for k in names)

    def ratio(x: str, y: str) -> float:
        """Median over repetitions of (y's wall time / x's): x's throughput relative to y's."""
        return statistics.median(ry["wall_s"] / rx["wall_s"] for rx, ry in zip(res[x]["runs"], res[y]["runs"]))
    ka, kb, kc, kd, ke = names
    lines = [f"{args.n} checkpoints x {args.size_mb} MiB float32, evicted from the page cache before every run, "
             f"median of {args.reps}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
             "floor and peers (the bench's Python): " + ", ".join(
                 f"{k} {v}" for k, v in versions(PY).items() if k in ("python", "numpy", "safetensors", "torch")),
             f"CPU: {cpu}, {os.cpu_count()} cores; load average before {load0[0]:.2f}, after {load1[0]:.2f}",
             f"{'case':<24}{'wall s':>8}{'cpu s':>8}{'MB/s':>8}{'x cat':>7}{'RssAnon MB':>12}{'bg cores':>10}"]
    for k, m in med.items():
        lines.append(f"{k:<24}{m['wall_s']:>8.2f}{m['cpu_s']:>8.2f}{total / 1e6 / m['wall_s']:>8.0f}"
                     f"{m['wall_s'] / b:>7.2f}{m['peak_rss_anon_mb']:>12.1f}{m['background_cores']:>10.2f}")
    read, job = ratio(kd, kb), ratio(ka, ke)
    lines.append(f"ema-avg's read throughput / cat's, output on tmpfs (b/d): {read:.2f} (medians {b / d:.2f}; "
                 f"target >= 0.9: {'ok' if read >= 0.9 else 'MISSED'})")
    lines.append(f"ema-avg / the job's disk floor, output on the inputs' disk (e/a): {job:.2f} (medians {e / a:.2f}; "
                 f"target >= 0.9: {'ok' if job >= 0.9 else 'MISSED'}); against cat alone (b/a): {ratio(ka, kb):.2f}")
    lines.append(f"torch peer / ema-avg (c/a): {ratio(ka, kc):.2f}")
    print("\n".join(lines))
    (out / "results-cold.json").write_text(json.dumps(
        {"params": vars(args), "versions": vers, "cpu": cpu, "load_before": load0, "load_after": load1,
         "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": res, "evicted": evicted, "table": lines}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    if shm != work:
        shutil.rmtree(shm, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
