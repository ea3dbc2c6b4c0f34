#!/usr/bin/env python
"""Benchmark: ema-avg against the least possible work and against the naive script.

Writes N checkpoints of SIZE MB float32 (64 tensors, 1M elements each at the
default 256 MB) with the real ``safetensors.numpy.save_file``, reads them once
so they sit in the page cache, then times, in the same run and on the same
files, each as its own process:

  (a) ``ema-avg <files> -o out.safetensors --force --quiet``  (uniform mean;
      extra rows: ``--decay 0.999`` and ``--dtype bfloat16``)
  (b) floor: ``safe_open(f, framework="numpy")`` for every input and, tensor by
      tensor, ``buf = zeros; for f in files: buf += f.get_tensor(name)``
      (the least work that touches every input byte; it writes nothing)
  (c) naive: ``load_file`` every checkpoint into a list, average each tensor
      (``sum(...) / n``), ``save_file`` the result
  (a') information row: the same engine called from ``python -c`` without the
      command line (what typer/rich/imports add to (a))

While each process runs, ``/proc/PID/status`` is polled every ~5 ms for
``RssAnon`` (anonymous memory: heap, numpy buffers; mmap'd file pages do not
count) and ``VmHWM``; wall time and CPU time (user+sys, from ``wait4``) are
recorded.  Every case runs ``--reps`` times (order rotated between
repetitions); the table shows medians.  Before every run the inputs are read
again (page cache) and the previous outputs are deleted (so nobody pays for
unlinking the last run's file).  The machine may be shared: the CPU time other
processes used during a run is recorded ("bg cores") and a run with more than
``--max-bg`` cores of background load is repeated (up to 3 times, the quietest
kept).  Scaling checks then run (a) on 2x the model (twice the tensors) and on
the same model cut into 16x larger tensors: peak RssAnon must stay flat.

    /work/venv/bin/python bench/bench_average.py [--size-mb 256] [--n 8] [--reps 3] [--keep]

Checkpoints go to ``bench/out/`` (git-ignored) and are reused when present with
the same parameters; ``--keep`` leaves them there after the run (default:
deleted at the end).  Figures go to ``bench/out/results.json``.  ``--ema`` times
another ema-avg command (e.g. an older checkout) against the same floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
EMA = str(Path(PY).with_name("ema-avg"))
# Measured processes run as a user's do: with bytecode caches.  (A session or CI
# environment may set PYTHONDONTWRITEBYTECODE, which makes every run compile
# ema-avg's modules again: about 0.15 s of start-up that no installed copy pays.)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
TENSORS = 64  # tensors per checkpoint at every size (1M float32 each at 256 MB)

FLOOR = r"""
import sys
import numpy as np
from safetensors import safe_open
files = [safe_open(p, framework="numpy") for p in sys.argv[1:]]
for name in files[0].keys():
    buf = None
    for f in files:
        x = f.get_tensor(name)
        if buf is None:
            buf = np.zeros(x.shape, dtype=x.dtype)
        buf += x
"""

# the same engine and writer as (a), called without the command line (typer, rich): shows
# what the CLI layer costs on top of the work (an information row, not a target)
ENGINE_ONLY = r"""
import sys
from ema_cli import engine
pool = engine.ReaderPool()
plan = engine.make_plan(sys.argv[2:], engine.Options(), out_format="safetensors", pool=pool)
engine.run(plan, sys.argv[1], "safetensors", force=True, pool=pool)
pool.close()
"""

NAIVE = r"""
import sys
import numpy as np
from safetensors.numpy import load_file, save_file
out, paths = sys.argv[1], sys.argv[2:]
ckpts = [load_file(p) for p in paths]
avg = {name: (sum(c[name] for c in ckpts) / len(ckpts)).astype(ckpts[0][name].dtype) for name in ckpts[0]}
save_file(avg, out)
"""


# --------------------------------------------------------------------------- data


def make_checkpoints(d: Path, n: int, size_mb: int, tensors: int, seed: int = 0) -> list[str]:
    """n checkpoints of size_mb MiB float32 each (``tensors`` equal tensors); reused when present."""
    import numpy as np
    from safetensors.numpy import save_file

    numel = size_mb * (1 << 20) // 4 // tensors
    if numel <= 0:
        raise SystemExit("--size-mb too small")
    spec = {"n": n, "size_mb": size_mb, "tensors": tensors, "numel": numel, "seed": seed}
    manifest = d / "manifest.json"
    paths = [d / f"ckpt-{1000 * (k + 1)}.safetensors" for k in range(n)]
    if manifest.exists() and json.loads(manifest.read_text()) == spec and all(p.exists() for p in paths):
        return [str(p) for p in paths]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base = {f"layer{i:03d}.weight": rng.standard_normal(numel, dtype=np.float32) for i in range(tensors)}
    t0 = time.perf_counter()
    for k, p in enumerate(paths):
        # a drifting trajectory: every checkpoint differs in every element
        ck = {name: (x + np.float32(0.01 * k) * x[::-1]).astype(np.float32) for name, x in base.items()}
        save_file(ck, str(p), metadata={"format": "pt"})
        del ck
        print(f"  wrote {p.name}", file=sys.stderr, flush=True)
    manifest.write_text(json.dumps(spec))
    print(f"  generated {n} x {size_mb} MB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return [str(p) for p in paths]


def warm(paths: list[str]) -> float:
    """Read every file once so that every case starts from the page cache."""
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


# The torch peer (what OLMo-core/mergekit-style scripts do): safe_open(framework="pt"), a
# float32 accumulator per tensor (acc.add_(t, alpha=w)), the result in the inputs' dtype,
# written with save_file.  argv: OUT INPUT...
TORCH_PEER = r"""
import sys
import torch
from safetensors import safe_open
from safetensors.torch import save_file
out, paths = sys.argv[1], sys.argv[2:]
w = 1.0 / len(paths)
files = [safe_open(p, framework="pt") for p in paths]
result = {}
for name in files[0].keys():
    acc = None
    for f in files:
        t = f.get_tensor(name)
        if acc is None:
            acc = torch.zeros(t.shape, dtype=torch.float32)
        acc.add_(t, alpha=w)
    result[name] = acc.to(t.dtype)
save_file(result, out, metadata={"format": "pt"})
"""


# --------------------------------------------------------------------------- the machine


VERSION_PACKAGES = ("ema-avg", "numpy", "ml_dtypes", "safetensors", "typer", "rich", "crc32c", "torch",
                    "tensorflow", "tensorflow-cpu")


def ema_python(ema_cmd: list[str]) -> str:
    """The Python that runs the ema-avg command: ``python -m ema_cli`` names it,
    a venv's ``ema-avg`` script lies beside it."""
    first = Path(ema_cmd[0])
    if first.name.startswith("python"):
        return str(first)
    beside = first.with_name("python")
    return str(beside) if beside.exists() else PY


def versions(python: str = PY) -> dict[str, str]:
    """Python's and the packages' versions in the environment of ``python`` (the
    one ema-avg runs in, which may be a fresh Quickstart venv, not the bench's)."""
    code = ("import json, platform; from importlib import metadata as m\n"
            "out = {'python': platform.python_version()}\n"
            f"for p in {VERSION_PACKAGES!r}:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "try:\n    from ema_cli import kernel\n"
            "    out['bf16 kernel'] = 'C' if kernel._C is not None else 'numpy'\n"
            "except ImportError: pass\n"
            "print(json.dumps(out))")
    # -I: not the current directory's ema_cli (a bench run from a checkout would import the source
    # tree, without the C kernel pip built into the venv), the installed one, as ema-avg runs it
    res = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


# The machine's cost of writing an output, probed: SIZE bytes of zeros to a new file the way
# ema-avg's writers do it (space reserved with posix_fallocate, 1 MiB pwrites, fsync).  On a VM that
# hands freed memory back to the hypervisor (virtio-balloon free page reporting) new page-cache pages
# may be faulted in again on the host: seen here, a 512 MiB file written 4 s after another was
# deleted took 1.8-2.4 s, and 0.25-0.3 s right after.  It shows how much that cost moves during a
# run; it does not track the writing cases run by run (one bench run had it at 2.3-3.8 s while
# ema-avg's whole runs, writing as much, took under 1.3 s), so it is not a cost to subtract.
# (Without the reservation the same write took 1.5-5 s after an ema-avg output was deleted, on
# ext4 mounted with discard.)
WRITE_PROBE = r"""
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
buf = memoryview(bytearray(1 << 20))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.posix_fallocate(fd, 0, size)
pos = 0
while pos < size:
    pos += os.pwrite(fd, buf[: min(len(buf), size - pos)], pos)
os.fsync(fd)
os.close(fd)
"""


def memory_notes() -> str:
    """What the kernel says of memory handed back to a hypervisor (free page reporting)."""
    notes = []
    try:
        for dev in Path("/sys/bus/virtio/devices").iterdir():
            if (dev / "device").read_text().strip() == "0x0005":  # virtio-balloon
                bits = (dev / "features").read_text().strip()
                notes.append("virtio-balloon free page reporting " + ("on" if len(bits) > 5 and bits[5] == "1"
                                                                     else "off"))
    except OSError:
        pass
    try:
        order = Path("/sys/module/page_reporting/parameters/page_reporting_order").read_text().strip()
        notes.append(f"page_reporting_order {order}")
    except OSError:
        pass
    try:
        notes.append("THP " + Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip())
    except OSError:
        pass
    return "; ".join(notes) or "no hypervisor memory notes"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- measuring


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "VmHWM:", "RssFile:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _busy_s() -> float:
    """CPU seconds spent by the whole machine so far (every process, every core)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:8]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], interval: float = 0.005) -> dict:
    """Run cmd; wall time, CPU time (user, sys), peak RssAnon / VmHWM (polled).

    ``background_cores``: CPU used by other processes during the run (machine
    busy time minus the child's own CPU time, per second of wall time)."""
    busy0 = _busy_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = peak_hwm = peak_file = samples = 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            wall = time.perf_counter() - t0
            busy = _busy_s() - busy0
            break
        s = _status(proc.pid)
        if s:
            samples += 1
            peak_anon = max(peak_anon, s.get("RssAnon", 0))
            peak_hwm = max(peak_hwm, s.get("VmHWM", 0))
            peak_file = max(peak_file, s.get("RssFile", 0))
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    cpu = ru.ru_utime + ru.ru_stime
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,  # kernel time: page faults, and on a VM the hypervisor's faults on fresh memory
        "background_cores": max(0.0, (busy - cpu) / wall),
        "peak_rss_anon_mb": peak_anon / 2**20,
        # polled, not wait4's ru_maxrss: that starts from the parent's resident set at fork (a bench that
        # generated its data in-process would show its own peak for every child)
        "peak_vm_hwm_mb": peak_hwm / 2**20,
        "peak_rss_file_mb": peak_file / 2**20,
        "samples": samples,
    }


def median_of(runs: list[dict]) -> dict:
    keys = ("wall_s", "cpu_s", "user_s", "sys_s", "background_cores", "peak_rss_anon_mb", "peak_vm_hwm_mb",
            "peak_rss_file_mb")
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {
        "best_wall_s": min(r["wall_s"] for r in runs),
        "max_peak_rss_anon_mb": max(r["peak_rss_anon_mb"] for r in runs),
        "wall_all_s": [round(r["wall_s"], 3) for r in runs],
    }


def run_cases(cases: dict[str, list[str]], reps: int, before=None, max_bg: float = 0.25,
              retries: int = 3) -> dict[str, dict]:
    """Every case ``reps`` times, order rotated.  The machine may be shared: a run
    during which other processes used more than ``max_bg`` cores is repeated (up
    to ``retries`` times, keeping the quietest) and its background load recorded."""
    runs: dict[str, list[dict]] = {k: [] for k in cases}
    names = list(cases)
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]  # rotate: no case always runs first
        for name in order:
            best = None
            for attempt in range(1 + retries):
                if before:
                    before()
                r = measure(cases[name])
                r["attempts"] = attempt + 1
                if best is None or r["background_cores"] < best["background_cores"]:
                    best = r
                if r["background_cores"] <= max_bg:
                    break
                time.sleep(1.0)
            r = best
            runs[name].append(r)
            print(f"  rep {rep + 1}/{reps}  {name:<28} {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s  "
                  f"RssAnon {r['peak_rss_anon_mb']:7.1f} MB  background {r['background_cores']:.2f} cores",
                  file=sys.stderr, flush=True)
    return {k: {"median": median_of(v), "runs": v} for k, v in runs.items()}


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=256, help="size of each checkpoint in MiB (default 256)")
    ap.add_argument("--n", type=int, default=8, help="number of checkpoints (default 8)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every case; medians reported (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints for the next run")
    ap.add_argument("--dir", default=str(HERE / "out"), help="bench directory (default bench/out)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the memory scaling checks")
    ap.add_argument("--no-extra", action="store_true", help="skip the --decay and bfloat16 rows")
    ap.add_argument("--ema", default=EMA, help="the ema-avg command to time, e.g. to compare two versions "
                    "(split like a shell line; default: the ema-avg next to this Python)")
    ap.add_argument("--max-bg", type=float, default=0.25,
                    help="repeat a run (up to 3 times) when other processes used more than this many cores")
    args = ap.parse_args()

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    data = out / f"data-{args.n}x{args.size_mb}mb"
    print(f"checkpoints: {args.n} x {args.size_mb} MB float32 in {data}", file=sys.stderr)
    paths = make_checkpoints(data, args.n, args.size_mb, TENSORS)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=out))
    avg = str(work / "avg.safetensors")
    t_warm = warm(paths)
    print(f"  page cache warmed in {t_warm:.2f} s", file=sys.stderr)

    ema_cmd = shlex.split(args.ema)
    ema = [*ema_cmd, *paths, "-o", avg, "--force", "--quiet"]
    cases = {
        "(a) ema-avg (mean)": ema,
        "(b) floor (safe_open, +=)": [PY, "-c", FLOOR, *paths],
        "(c) naive (load_file all)": [PY, "-c", NAIVE, str(work / "naive.safetensors"), *paths],
    }
    if not args.no_extra:
        cases["(a) ema-avg --decay 0.999"] = ema + ["--decay", "0.999"]
        cases["(a) ema-avg --dtype bfloat16"] = ema + ["--dtype", "bfloat16"]
        if args.ema == EMA:
            cases["(a') engine only, no CLI"] = [PY, "-c", ENGINE_ONLY, avg, *paths]

    # warm the interpreters' own files too (imports), then measure
    subprocess.run([PY, "-c", "import numpy, safetensors, ml_dtypes, ema_cli.cli"], check=True)
    subprocess.run([*ema_cmd, "--help"], check=True, stdout=subprocess.DEVNULL)
    def fresh(inputs):
        # every case starts with its inputs in the page cache and writes a new file
        # (deleting the previous output is not part of anyone's work)
        for f in work.iterdir():
            f.unlink()
        warm(inputs)

    res = run_cases(cases, args.reps, before=lambda: fresh(paths), max_bg=args.max_bg)

    scaling = None
    if not args.no_scaling:
        # (a) again on 2x the model (twice the tensors), then on the same model
        # size cut into 16x larger tensors: peak RssAnon must not follow either
        one = res["(a) ema-avg (mean)"]["median"]
        scaling = {"base": {"model_mb": args.size_mb, "tensors": TENSORS,
                            "tensor_mb": args.size_mb / TENSORS, **one}}
        for key, size, tensors in (("2x_model", 2 * args.size_mb, 2 * TENSORS),
                                   ("16x_tensor_size", args.size_mb, max(1, TENSORS // 16))):
            d = out / f"data-{args.n}x{size}mb-{tensors}t"
            print(f"scaling check: {args.n} x {size} MB in {tensors} tensors of {size / tensors:g} MB",
                  file=sys.stderr)
            ps = make_checkpoints(d, args.n, size, tensors)
            warm(ps)
            name = f"(a) ema-avg {key}"
            r = run_cases({name: [*ema_cmd, *ps, "-o", avg, "--force", "--quiet"]},
                          max(1, args.reps - 1), before=lambda ps=ps: fresh(ps), max_bg=args.max_bg)
            scaling[key] = {"model_mb": size, "tensors": tensors, "tensor_mb": size / tensors,
                            **r[name]["median"], "runs": r[name]["runs"]}
            scaling[key]["ratio_rss_anon"] = scaling[key]["peak_rss_anon_mb"] / one["peak_rss_anon_mb"]
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)

    a = res["(a) ema-avg (mean)"]["median"]
    b = res["(b) floor (safe_open, +=)"]["median"]
    c = res["(c) naive (load_file all)"]["median"]
    summary = {
        "a_over_floor": a["wall_s"] / b["wall_s"],
        "a_over_naive": a["wall_s"] / c["wall_s"],
        "a_peak_rss_anon_mb": a["peak_rss_anon_mb"],
        "targets": {"a_over_floor <= 1.5": a["wall_s"] / b["wall_s"] <= 1.5,
                    "a_over_naive <= 1/3": a["wall_s"] / c["wall_s"] <= 1 / 3,
                    "peak_rss_anon <= 200 MB": max(r["max_peak_rss_anon_mb"] for k, r in
                                                   ((k, v["median"]) for k, v in res.items())
                                                   if k.startswith("(a)")) <= 200
                    and all(sc["max_peak_rss_anon_mb"] <= 200 for sc in (scaling or {}).values())},
    }

    # table
    width = max(len(k) for k in res) + 2
    lines = [f"{args.n} checkpoints x {args.size_mb} MB float32 ({TENSORS} tensors), page-cached, "
             f"median of {args.reps}, {os.cpu_count()} cores",
             "versions: " + ", ".join(f"{k} {v}" for k, v in versions(ema_python(ema_cmd)).items()),
             f"CPU: {cpu_model()}; load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f}",
             f"memory: {memory_notes()}",
             f"{'case':<{width}}{'wall s':>8}{'best s':>8}{'user s':>8}{'sys s':>8}{'x floor':>9}{'x naive':>9}"
             f"{'RssAnon MB':>12}{'VmHWM MB':>10}{'bg cores':>10}"]
    for k, v in res.items():
        m = v["median"]
        lines.append(f"{k:<{width}}{m['wall_s']:>8.2f}{m['best_wall_s']:>8.2f}{m['user_s']:>8.2f}{m['sys_s']:>8.2f}"
                     f"{m['wall_s'] / b['wall_s']:>9.2f}"
                     f"{m['wall_s'] / c['wall_s']:>9.2f}{m['peak_rss_anon_mb']:>12.1f}{m['peak_vm_hwm_mb']:>10.1f}"
                     f"{m['background_cores']:>10.2f}")
    if scaling:
        for key, sc in scaling.items():
            lines.append(f"scaling {key:<16} model {sc['model_mb']:>5g} MB, {sc['tensors']:>3} tensors of "
                         f"{sc['tensor_mb']:>4g} MB: wall {sc['wall_s']:5.2f} s, peak RssAnon {sc['peak_rss_anon_mb']:6.1f} MB, "
                         f"VmHWM {sc['peak_vm_hwm_mb']:6.1f} MB")
    lines.append("targets: " + ", ".join(f"{k}: {'ok' if ok else 'MISSED'}" for k, ok in summary["targets"].items()))
    print("\n".join(lines))

    doc = {
        "params": {"n": args.n, "size_mb": args.size_mb, "tensors": TENSORS, "reps": args.reps, "ema": args.ema},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "warm_s": t_warm,
        "cases": res,
        "summary": summary,
        "scaling": scaling,
        "table": lines,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
