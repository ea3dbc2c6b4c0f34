#!/usr/bin/env python
"""Benchmark: bf16 end to end on an LLM-shaped model, and start-up.

Writes N safetensors checkpoints of about SIZE MiB of bfloat16 matrices
shaped like an LLM's (4096x4096 attention, 4096x11008 and 11008x4096 MLP),
reads them once so they sit in the page cache, then times, in one run and on
the same files, each as its own process (``bench_average.measure``: wall,
user and sys CPU, peak RssAnon, background load; medians and the best run):

  (a) ``ema-avg <files> -o out.safetensors --force --quiet``: the uniform mean,
      written in bf16 (the input dtype); and the same with ``--threads 1``
  (b) floor, one thread: ``mmap`` every input, widen bf16 through the
      ``uint16 -> uint32`` shift viewed as float32, accumulate in 64K-element
      float32 blocks; writes nothing
  (c) the torch peer: ``safe_open(framework="pt")``, per tensor a float32
      accumulator ``acc.add_(t, alpha=w)``, the result cast to bf16 and written
      with ``safetensors.torch.save_file`` (what OLMo-core/mergekit-style
      scripts do)
  (w) write probe: one checkpoint's bytes written to a new file the way
      ema-avg's writers do (``bench_average.WRITE_PROBE``): how much the
      machine's cost of writing an output moves during the run ((a) and (c)
      write one, (b) does not); not a cost to subtract

Start-up rows: ``ema-avg --version``, and a whole 3-file tiny safetensors
average (float32 and bf16), as processes.  The versions of Python, numpy,
ml_dtypes, safetensors, torch, typer and TensorFlow, the CPU model and the
load average before and after the run are printed with the figures.

    /work/venv/bin/python bench/bench_bf16.py [--size-mb 256] [--n 6] [--reps 3] [--keep]

Targets (issue 15): (a) <= 2x (b), and (c) / (a) >= 1.5; start-up: --version
<= 0.15 s, tiny average <= 0.35 s.  Figures go to bench/out/results-bf16.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_average import (PY, TORCH_PEER, WRITE_PROBE, cpu_model, ema_python, measure, memory_notes,  # noqa: E402
                           run_cases, versions, warm)

# the code of this checkout (PYTHONPATH), not whatever console script the venv holds
EMA = f"{PY} -m ema_cli"

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))

FLOOR = r"""
import json, mmap, struct, sys
import numpy as np
BLOCK = 1 << 16
maps = []
for p in sys.argv[1:]:
    fh = open(p, "rb")
    n = struct.unpack("<Q", fh.read(8))[0]
    head = json.loads(fh.read(n))
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    maps.append((mm, 8 + n, head))
u32 = np.empty(BLOCK, np.uint32)
f32 = u32.view(np.float32)
acc = np.empty(BLOCK, np.float32)
w = np.float32(1.0 / len(maps))
for name, e in maps[0][2].items():
    if name == "__metadata__":
        continue
    views = []
    for mm, base, head in maps:
        b0, b1 = head[name]["data_offsets"]
        views.append(np.frombuffer(mm, dtype=np.uint16, count=(b1 - b0) // 2, offset=base + b0))
    n = views[0].size
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        a, u, f = acc[:m], u32[:m], f32[:m]
        for k, v in enumerate(views):
            np.left_shift(v[s:s + m], 16, out=u, dtype=np.uint32)
            if k == 0:
                np.copyto(a, f)
            else:
                np.add(a, f, out=a)
        a *= w  # the mean: the sum, then one scaling
"""



def write_bf16_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, int], int]]) -> None:
    """A safetensors file of bf16 matrices (random normal bits), written by hand:
    the header, then the raw little-endian bf16 bytes (no ml_dtypes needed)."""
    import numpy as np

    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, _) in tensors.items():
        nb = 2 * shape[0] * shape[1]
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + nb]}
        pos += nb
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name, (shape, seed) in tensors.items():
            rng = np.random.default_rng(seed)
            for r in range(0, shape[0], 1024):
                x = rng.standard_normal((min(1024, shape[0] - r), shape[1]), dtype=np.float32)
                fh.write((x.view(np.uint32) >> 16).astype("<u2").tobytes())


def make_model(d: Path, n: int, size_mb: int) -> list[str]:
    tensors, total, i = {}, 0, 0
    while True:
        shape = SHAPES[i % len(SHAPES)]
        nb = 2 * shape[0] * shape[1]
        if tensors and total + nb > size_mb << 20:
            break
        tensors[f"model.layers.{i // 3}.{('attn.q', 'mlp.up', 'mlp.down')[i % 3]}.weight"] = shape
        total += nb
        i += 1
    spec = {"n": n, "size_mb": size_mb, "tensors": {k: list(v) for k, v in tensors.items()}}
    manifest = d / "manifest.json"
    paths = [d / f"model-step{1000 * (k + 1)}.safetensors" for k in range(n)]
    if manifest.exists() and json.loads(manifest.read_text()) == spec and all(p.exists() for p in paths):
        return [str(p) for p in paths]
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for k, p in enumerate(paths):
        write_bf16_safetensors(p, {name: (shape, 1000 * k + j) for j, (name, shape) in enumerate(tensors.items())})
        print(f"  wrote {p.name} ({total / 2**20:.0f} MiB, {len(tensors)} tensors)", file=sys.stderr, flush=True)
    manifest.write_text(json.dumps(spec))
    return [str(p) for p in paths]


def startup_rows(work: Path, ema_cmd: list[str], reps: int) -> dict[str, dict]:
    """--version and a 3-file tiny average, each a whole process, best and median of reps."""
    import numpy as np
    from safetensors.numpy import save_file

    (work / "tiny32").mkdir()
    (work / "tiny16").mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        save_file({"w": rng.standard_normal((16, 16)).astype(np.float32),
                   "b": rng.standard_normal(16).astype(np.float32)}, str(work / "tiny32" / f"ckpt-{k + 1}00.safetensors"))
        write_bf16_safetensors(work / "tiny16" / f"ckpt-{k + 1}00.safetensors", {"w": ((16, 16), k), "v": ((4, 16), 9 + k)})
    f32 = sorted(str(p) for p in (work / "tiny32").iterdir())
    bf16 = sorted(str(p) for p in (work / "tiny16").iterdir())
    cases = {"--version": [*ema_cmd, "--version"],
             "python -c pass": [PY, "-c", "pass"],
             "python -c 'import numpy'": [PY, "-c", "import numpy"],
             "python -c 'import ml_dtypes'": [PY, "-c", "import ml_dtypes"],
             "tiny average f32 (3 files)": [*ema_cmd, *f32, "-o", str(work / "t32.safetensors"), "--force", "--quiet"],
             "tiny average bf16 (3 files)": [*ema_cmd, *bf16, "-o", str(work / "t16.safetensors"), "--force", "--quiet"]}
    out = {}
    for name, cmd in cases.items():
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # the interpreter's files in the page cache
        runs = [measure(cmd, interval=0.002) for _ in range(reps)]
        out[name] = {"best_s": min(r["wall_s"] for r in runs), "median_s": statistics.median(r["wall_s"] for r in runs),
                     "background_cores": statistics.median(r["background_cores"] for r in runs)}
        print(f"  start-up {name:<28} best {out[name]['best_s']:.3f} s  median {out[name]['median_s']:.3f} s",
              file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=256, help="about this many MiB of bf16 per checkpoint (default 256)")
    ap.add_argument("--n", type=int, default=6, help="number of checkpoints (default 6)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every case; medians reported (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints for the next run")
    ap.add_argument("--dir", default=str(HERE / "out"), help="bench directory (default bench/out)")
    ap.add_argument("--ema", default=EMA, help="the ema-avg command (split like a shell line)")
    ap.add_argument("--max-bg", type=float, default=0.25,
                    help="repeat a run (up to 3 times) when other processes used more than this many cores")
    ap.add_argument("--startup-reps", type=int, default=7, help="repetitions of the start-up rows (default 7)")
    args = ap.parse_args()

    import shlex

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    vers, cpu = versions(ema_python(shlex.split(args.ema))), cpu_model()
    print(f"versions: {json.dumps(vers)}\nCPU: {cpu}, {os.cpu_count()} cores; load average {load0}", file=sys.stderr)
    data = out / f"bf16-{args.n}x{args.size_mb}mb"
    paths = make_model(data, args.n, args.size_mb)
    work = Path(tempfile.mkdtemp(prefix="run-bf16-", dir=out))
    ema_cmd = shlex.split(args.ema)
    avg = str(work / "avg.safetensors")
    cases = {
        "(a) ema-avg mean -> bf16": [*ema_cmd, *paths, "-o", avg, "--force", "--quiet"],
        "(a) ema-avg --threads 1": [*ema_cmd, *paths, "-o", avg, "--force", "--quiet", "--threads", "1"],
        "(b) floor (1 thread, no write)": [PY, "-c", FLOOR, *paths],
        "(c) torch peer": [PY, "-c", "import torch; torch.set_num_threads(1)\n" + TORCH_PEER,
                           str(work / "torch.safetensors"), *paths],
        # the machine's cost of writing an output, probed (bench_average.WRITE_PROBE)
        f"(w) write probe ({os.path.getsize(paths[0]) / 2**20:.0f} MiB)": [PY, "-c", WRITE_PROBE,
                                                                     str(work / "probe.bin"),
                                                                     str(os.path.getsize(paths[0]))],
    }
    subprocess.run([*ema_cmd, "--help"], check=True, stdout=subprocess.DEVNULL)

    def fresh():
        for f in work.iterdir():
            if f.is_file():
                f.unlink()
        warm(paths)

    res = run_cases(cases, args.reps, before=fresh, max_bg=args.max_bg)
    start = startup_rows(work, ema_cmd, args.startup_reps)
    load1 = os.getloadavg()

    a = res["(a) ema-avg mean -> bf16"]["median"]
    a1 = res["(a) ema-avg --threads 1"]["median"]
    b = res["(b) floor (1 thread, no write)"]["median"]
    c = res["(c) torch peer"]["median"]
    gb = args.n * sum(os.path.getsize(p) for p in paths[:1]) / 1e9
    summary = {
        "a_over_floor": a["wall_s"] / b["wall_s"], "a1_over_floor": a1["wall_s"] / b["wall_s"],
        "a_over_floor_best": a["best_wall_s"] / b["best_wall_s"],
        "a1_over_floor_best": a1["best_wall_s"] / b["best_wall_s"],
        "torch_over_a": c["wall_s"] / a["wall_s"], "torch_over_a1": c["wall_s"] / a1["wall_s"],
        "targets": {"a <= 2x floor": a["wall_s"] <= 2 * b["wall_s"],
                    "torch >= 1.5x a": c["wall_s"] >= 1.5 * a["wall_s"],
                    "--version <= 0.15 s": start["--version"]["best_s"] <= 0.15,
                    "tiny average <= 0.35 s": start["tiny average f32 (3 files)"]["best_s"] <= 0.35},
    }
    width = max(len(k) for k in res) + 2
    lines = [f"{args.n} checkpoints x {gb / args.n * 1000:.0f} MB bf16 (LLM-shaped matrices), page-cached, "
             f"median and best of {args.reps}",
             f"versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
             "floor and peers (the bench's Python): " + ", ".join(
                 f"{k} {v}" for k, v in versions(PY).items() if k in ("python", "numpy", "safetensors", "torch")),
             f"CPU: {cpu}, {os.cpu_count()} cores; load average before {load0[0]:.2f}, after {load1[0]:.2f}",
             f"memory: {memory_notes()}",
             f"{'case':<{width}}{'wall s':>8}{'best s':>8}{'user s':>8}{'sys s':>8}{'GB/s':>7}{'x floor':>9}"
             f"{'best x':>8}{'RssAnon MB':>12}{'bg cores':>10}"]
    for k, v in res.items():
        m = v["median"]
        if k.startswith("(w)"):  # one output's bytes written, not the inputs read: no floor ratio
            rate, ratios = os.path.getsize(paths[0]) / 1e9 / m["wall_s"], f"{'-':>9}{'-':>8}"
        else:
            rate = gb / m["wall_s"]
            ratios = f"{m['wall_s'] / b['wall_s']:>9.2f}{m['best_wall_s'] / b['best_wall_s']:>8.2f}"
        lines.append(f"{k:<{width}}{m['wall_s']:>8.2f}{m['best_wall_s']:>8.2f}{m['user_s']:>8.2f}{m['sys_s']:>8.2f}"
                     f"{rate:>7.2f}{ratios}{m['peak_rss_anon_mb']:>12.1f}{m['background_cores']:>10.2f}")
    for k, v in start.items():
        lines.append(f"start-up {k:<30} best {v['best_s']:.3f} s, median {v['median_s']:.3f} s "
                     f"(bg {v['background_cores']:.2f} cores)")
    lines.append(f"torch peer / ema-avg: {summary['torch_over_a']:.2f} (--threads 1: {summary['torch_over_a1']:.2f})")
    lines.append("targets: " + ", ".join(f"{k}: {'ok' if ok else 'MISSED'}" for k, ok in summary["targets"].items()))
    print("\n".join(lines))
    doc = {"params": vars(args), "versions": vers, "cpu": cpu, "cpus": os.cpu_count(), "load_before": load0,
           "load_after": load1, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": res, "startup": start,
           "summary": summary, "table": lines}
    (out / "results-bf16.json").write_text(json.dumps(doc, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
