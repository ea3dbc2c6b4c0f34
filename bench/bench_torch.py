#!/usr/bin/env python
"""Benchmark: PyTorch checkpoints against the same tensors in safetensors.

Writes N checkpoints of SIZE MB float32 with bench_average's generator
(safetensors), then the same tensors as ``torch.save`` files (``{"model":
state_dict, "step": S}``, the zip format), warms the page cache, and times each
case as its own process with bench_average's sampler (``/proc/PID/status``
``RssAnon`` polled every ~5 ms; mapped file pages do not count):

  st -> st   ``ema-avg ckpt-*.safetensors -o out.safetensors``  (the reference)
  pt -> st   ``ema-avg ckpt-*.pt -o out.safetensors``
  pt -> pt   ``ema-avg ckpt-*.pt -o out.pt``  (the writer's scratch mapping + torch.save)

and reports each case's wall time relative to st -> st and its peak RssAnon.
Not a timed test: run it by hand.

    /work/venv/bin/python bench/bench_torch.py [--size-mb 256] [--n 8] [--reps 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_average import EMA, TENSORS, make_checkpoints, run_cases, warm  # noqa: E402


def to_torch(paths: list[str], d: Path) -> list[str]:
    """The same tensors as torch.save files (one checkpoint in memory at a time)."""
    import torch
    from safetensors.torch import load_file

    out = []
    d.mkdir(parents=True, exist_ok=True)
    for p in paths:
        q = d / (Path(p).name.replace(".safetensors", ".pt"))
        if not q.exists() or q.stat().st_mtime < Path(p).stat().st_mtime:
            sd = load_file(p)
            step = int(Path(p).stem.split("-")[-1])
            torch.save({"model": sd, "step": step}, q)
            del sd
            print(f"  wrote {q.name}", file=sys.stderr, flush=True)
        out.append(str(q))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--ema", default=EMA, help="the ema-avg command (split like a shell line; its Python needs torch)")
    args = ap.parse_args()
    import shlex

    from bench_average import cpu_model, ema_python, memory_notes, versions

    ema_cmd = shlex.split(args.ema)
    load0 = os.getloadavg()
    root = HERE / "out" / "torch"
    st = make_checkpoints(root / "st", args.n, args.size_mb, TENSORS)
    pt = to_torch(st, root / "pt")
    res = root / "res"
    res.mkdir(exist_ok=True)
    outs = {"st -> st": res / "avg.safetensors", "pt -> st": res / "avg-pt.safetensors", "pt -> pt": res / "avg.pt"}
    cases = {
        "st -> st": [*ema_cmd, *st, "-o", str(outs["st -> st"]), "--force", "--quiet"],
        "pt -> st": [*ema_cmd, *pt, "-o", str(outs["pt -> st"]), "--force", "--quiet"],
        "pt -> pt": [*ema_cmd, *pt, "-o", str(outs["pt -> pt"]), "--force", "--quiet"],
    }

    def before():
        for p in outs.values():
            if p.exists():
                p.unlink()
        warm(st + pt)

    results = run_cases(cases, args.reps, before=before)
    ref = results["st -> st"]["median"]["wall_s"]
    print(f"\n{args.n} x {args.size_mb} MB float32, {TENSORS} tensors each; medians and bests of {args.reps}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions(ema_python(ema_cmd)).items()))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average before {load0[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")
    print(f"memory: {memory_notes()}")
    best = results["st -> st"]["median"]["best_wall_s"]
    print(f"{'case':<10} {'wall s':>8} {'vs st':>7} {'best s':>8} {'vs st':>7} {'user s':>8} {'sys s':>8} "
          f"{'peak RssAnon MB':>16}")
    for name, r in results.items():
        m = r["median"]
        print(f"{name:<10} {m['wall_s']:8.2f} {m['wall_s'] / ref:7.2f} {m['best_wall_s']:8.2f} "
              f"{m['best_wall_s'] / best:7.2f} {m['user_s']:8.2f} {m['sys_s']:8.2f} "
              f"{r['median']['max_peak_rss_anon_mb']:16.1f}")
    doc = {"machine": platform.platform(), "cpus": os.cpu_count(), "n": args.n, "size_mb": args.size_mb,
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
    (root / "results.json").write_text(json.dumps(doc, indent=2))
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
