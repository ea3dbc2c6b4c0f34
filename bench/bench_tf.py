#!/usr/bin/env python
"""Benchmark: ema-avg on TensorFlow checkpoints against a t2t-style script.

Writes N TF1 name-based checkpoints of SIZE MiB float32 each (``--tensors``
equal tensors plus ``global_step``) with ``tf.raw_ops.SaveV2``, reads them once
so they sit in the page cache, then times, each as its own process on the same
files:

  (a) ``ema-avg DIR -o out/avg.ckpt --force --quiet``            (mean, TF out)
  (b) t2t-style baseline, the way tensor2tensor's ``avg_checkpoints.py`` does
      it: ``tf.train.load_checkpoint`` every checkpoint and add every variable
      into float64 numpy buffers, divide, then build a TF1 graph with one
      variable + placeholder + assign per tensor and write it with a ``Saver``
  (c) ``ema-avg DIR -o out/avg.safetensors --force --quiet``     (TF in, safetensors out)
  (d) ``ema-avg DIR -o out/exact.ckpt --decay 0.999 --tf-exact`` (float32 replay)
  (e) ``ema-avg ST_DIR -o out/avg.safetensors``: the same tensors as safetensors
      files (written once from the TF checkpoints), the reference for (a), (c)
  (w) write probe: one checkpoint's bytes of zeros written to a new file
      (``bench_average.WRITE_PROBE``): how much the machine's cost of writing
      moves during the run (on a VM with free page reporting, new page-cache
      pages can stall on the hypervisor); not a cost to subtract

Each case runs as its own process, measured by ``bench_average.measure``
(wall; user and sys CPU from ``wait4``; peak ``RssAnon``, anonymous memory,
and ``VmHWM``, peak resident set including TensorFlow's ~0.5 GB of shared
libraries, polled from ``/proc/PID/status``; the CPU other processes used).
Each case runs ``--reps`` times (order rotated; a run under background load is
repeated); the table shows medians and the best run, and each
TF/safetensors ratio is given by the medians, by the best runs and as the
median of the per-repetition ratios.  The outputs of (a) and (b) are
compared at the end.

    /work/venv/bin/python bench/bench_tf.py [--size-mb 48] [--n 8] [--tensors 32] [--reps 5] [--keep]
        [--cases a,c,e,w] [--no-compare]

Data goes to ``bench/out/tf-<n>x<size>mb`` (reused when present); figures to
``bench/out/results_tf.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # measured processes keep bytecode caches, as a user's do
EMA = [PY, "-m", "ema_cli"]  # the ema_cli on PYTHONPATH (a worktree), not whatever the venv's script points at
os.environ.update(TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")  # (the t2t-style script's TF, quiet)

T2T = r"""
import os, sys
import numpy as np
import tensorflow as tf
v1 = tf.compat.v1
out, paths = sys.argv[1], sys.argv[2:]
var_list = tf.train.list_variables(paths[0])
var_values, var_dtypes = {}, {}
for name, shape in var_list:
    if not name.startswith("global_step"):
        var_values[name] = np.zeros(shape)
for p in paths:
    reader = tf.train.load_checkpoint(p)
    for name in var_values:
        tensor = reader.get_tensor(name)
        var_dtypes[name] = tensor.dtype
        var_values[name] += tensor
for name in var_values:
    var_values[name] /= len(paths)
with tf.Graph().as_default():
    tf_vars = [v1.get_variable(n, shape=var_values[n].shape, dtype=var_dtypes[n]) for n in var_values]
    placeholders = [v1.placeholder(v.dtype, shape=v.shape) for v in tf_vars]
    assign_ops = [v1.assign(v, p) for v, p in zip(tf_vars, placeholders)]
    global_step = tf.Variable(0, name="global_step", trainable=False, dtype=tf.int64)
    saver = v1.train.Saver(v1.global_variables())
    with v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        for p, op, name in zip(placeholders, assign_ops, var_values):
            sess.run(op, {p: var_values[name]})
        saver.save(sess, out)
"""


# --------------------------------------------------------------------------- data


def make_checkpoints(d: Path, n: int, size_mb: int, tensors: int, seed: int = 0) -> list[str]:
    os.environ.update(TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    import numpy as np

    numel = size_mb * (1 << 20) // 4 // tensors
    spec = {"n": n, "size_mb": size_mb, "tensors": tensors, "numel": numel, "seed": seed}
    manifest = d / "manifest.json"
    prefixes = [d / f"model.ckpt-{1000 * (k + 1)}" for k in range(n)]
    if manifest.exists() and json.loads(manifest.read_text()) == spec and all(
            Path(str(p) + ".index").exists() for p in prefixes):
        return [str(p) for p in prefixes]
    import tensorflow as tf

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base = {f"layer_{i:03d}/kernel": rng.standard_normal(numel, dtype=np.float32).reshape(-1, 256)
            for i in range(tensors)}
    t0 = time.perf_counter()
    for k, p in enumerate(prefixes):
        names = sorted(base) + ["global_step"]
        vals = [tf.constant(base[nm] + np.float32(0.01 * k) * base[nm][::-1]) for nm in sorted(base)]
        vals.append(tf.constant(np.int64(1000 * (k + 1))))
        tf.raw_ops.SaveV2(prefix=str(p), tensor_names=names, shape_and_slices=[""] * len(names), tensors=vals)
        del vals
    (d / "checkpoint").write_text(f'model_checkpoint_path: "{prefixes[-1].name}"\n'
                                  f'all_model_checkpoint_paths: "{prefixes[-1].name}"\n')
    manifest.write_text(json.dumps(spec))
    print(f"  generated {n} x {size_mb} MiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return [str(p) for p in prefixes]


def make_safetensors(prefixes: list[str], d: Path) -> None:
    """The same tensors as safetensors files, one per checkpoint (reused when present)."""
    from safetensors.numpy import save_file

    from ema_cli.formats import tf_bundle

    d.mkdir(parents=True, exist_ok=True)
    for p in prefixes:
        f = d / (Path(p).name + ".safetensors")
        if f.exists():
            continue
        b = tf_bundle.Bundle(p)
        save_file({n: b.read(n).copy() for n in b.tensors}, str(f))
        b.close()


def warm(d: Path) -> None:
    buf = bytearray(16 << 20)
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


# --------------------------------------------------------------------------- measuring


def clean(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=48)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--dir", default=str(HERE / "out"))
    ap.add_argument("--cases", default="a,b,c,d,e,w", help="which cases (letters above), comma-separated")
    ap.add_argument("--max-bg", type=float, default=0.25,
                    help="repeat a run (up to 3 times) when other processes used more than this many cores")
    ap.add_argument("--no-compare", action="store_true", help="skip the (a) vs (b) output comparison")
    ap.add_argument("--ema", default=" ".join(EMA), help="the ema-avg command (split like a shell line), e.g. a "
                    "fresh Quickstart venv's ema-avg; default: python -m ema_cli")
    args = ap.parse_args()
    import shlex

    from bench_average import WRITE_PROBE, cpu_model, ema_python, memory_notes, run_cases
    from bench_average import versions as env_versions

    ema_cmd = shlex.split(args.ema)
    load0 = os.getloadavg()
    vers = env_versions(ema_python(ema_cmd))
    print(vers, file=sys.stderr)

    base = Path(args.dir)
    data = base / f"tf-{args.n}x{args.size_mb}mb"
    prefixes = make_checkpoints(data, args.n, args.size_mb, args.tensors)
    out = base / "tf-out"
    total_mb = sum(f.stat().st_size for f in data.iterdir() if f.is_file()) / 2**20
    out_bytes = sum(os.path.getsize(p) for p in data.glob(Path(prefixes[0]).name + ".data-*"))
    st_dir = base / f"st-{args.n}x{args.size_mb}mb"
    want = set(args.cases.split(","))
    if "e" in want:
        make_safetensors(prefixes, st_dir)
    ST = "ema-avg (safetensors -> safetensors)"
    cases = {
        "ema-avg (TF -> TF)": ("a", [*ema_cmd, str(data), "-o", str(out / "avg.ckpt"), "--force", "--quiet"]),
        "t2t-style (load_checkpoint + Saver)": ("b", [PY, "-c", T2T, str(out / "t2t" / "avg.ckpt"), *prefixes]),
        "ema-avg (TF -> safetensors)": ("c", [*ema_cmd, str(data), "-o", str(out / "avg.safetensors"), "--force",
                                              "--quiet"]),
        "ema-avg --tf-exact --decay 0.999": ("d", [*ema_cmd, str(data), "-o", str(out / "exact.ckpt"), "--force",
                                                   "--quiet", "--decay", "0.999", "--tf-exact"]),
        ST: ("e", [*ema_cmd, str(st_dir), "-o", str(out / "st.safetensors"), "--force", "--quiet"]),
        f"write probe ({out_bytes / 2**20:.0f} MiB, new file)": ("w", [PY, "-c", WRITE_PROBE, str(out / "probe.bin"),
                                                                       str(out_bytes)]),
    }
    cases = {k: cmd for k, (letter, cmd) in cases.items() if letter in want}

    def before():
        clean(out)
        (out / "t2t").mkdir()
        warm(data)
        if "e" in want:
            warm(st_dir)

    res = run_cases(cases, args.reps, before=before, max_bg=args.max_bg)
    runs = {k: v["runs"] for k, v in res.items()}
    med = {k: v["median"] for k, v in res.items()}

    def table(extra: str = "") -> list[str]:
        load1 = os.getloadavg()
        lines = [f"{args.n} TF checkpoints x {args.size_mb} MiB ({args.tensors} float32 tensors + global_step), "
                 f"{total_mb:.0f} MiB in all, page-cached; medians and bests of {args.reps}",
                 "versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
                 f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average before {load0[0]:.2f}, "
                 f"after {load1[0]:.2f}",
                 f"memory: {memory_notes()}",
                 f"{'case':<40} {'wall s':>7} {'best s':>7} {'user s':>7} {'sys s':>7} {'RssAnon MB':>11} "
                 f"{'VmHWM MB':>9} {'bg cores':>9}"]
        for k, m in med.items():
            lines.append(f"{k:<40} {m['wall_s']:7.2f} {m['best_wall_s']:7.2f} {m['user_s']:7.2f} {m['sys_s']:7.2f} "
                         f"{m['peak_rss_anon_mb']:11.0f} {m['peak_vm_hwm_mb']:9.0f} {m['background_cores']:9.2f}")
        if ST in med:
            st = med[ST]
            for k in ("ema-avg (TF -> TF)", "ema-avg (TF -> safetensors)"):
                if k in med:
                    # the machine's speed drifts between repetitions and a write can stall on the
                    # hypervisor (the write probe row): the ratio of the medians, of the best runs
                    # (timeit's rule: noise only adds), and the median of the per-repetition ratios
                    # (the cases of one repetition run back to back)
                    per_rep = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[k], runs[ST])]
                    lines.append(f"{k} / safetensors -> safetensors (target <= 1.3): medians "
                                 f"{med[k]['wall_s'] / st['wall_s']:.2f}, bests "
                                 f"{med[k]['best_wall_s'] / st['best_wall_s']:.2f}, median of the per-repetition "
                                 f"ratios {statistics.median(per_rep):.2f}; user CPU "
                                 f"{med[k]['user_s'] / st['user_s']:.2f}")
        if "t2t-style (load_checkpoint + Saver)" in med and "ema-avg (TF -> TF)" in med:
            lines.append(f"ema-avg (TF -> TF) / t2t-style: "
                         f"{med['ema-avg (TF -> TF)']['wall_s'] / med['t2t-style (load_checkpoint + Saver)']['wall_s']:.2f}"
                         f" (target <= 0.2)")
        rss = max(m["max_peak_rss_anon_mb"] for k, m in med.items() if k.startswith("ema-avg"))
        lines.append(f"peak RssAnon of ema-avg: {rss:.0f} MB (target <= 200)" + extra)
        return lines

    if args.no_compare or not {"a", "b"} <= want:
        lines = table()
        print("\n".join(lines))
        (base / "results_tf.json").write_text(json.dumps({"params": vars(args), "versions": vers,
                                                          "median": med, "runs": runs, "table": lines}, indent=2))
        return 0
    # the two TF outputs agree (run them once more, side by side)
    before()
    for k in ("ema-avg (TF -> TF)", "t2t-style (load_checkpoint + Saver)"):
        p = subprocess.run(cases[k], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"command failed ({p.returncode}): {' '.join(cases[k][:6])} ...\n{p.stderr}")
    os.environ.update(TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    import numpy as np
    import tensorflow as tf

    ours, theirs = tf.train.load_checkpoint(str(out / "avg.ckpt")), tf.train.load_checkpoint(str(out / "t2t" / "avg.ckpt"))
    max_ulp_diff = 0
    for name in ours.get_variable_to_shape_map():
        if name == "global_step":
            continue
        a, b = ours.get_tensor(name), theirs.get_tensor(name)
        max_ulp_diff = max(max_ulp_diff, int(np.max(np.abs(a.view(np.int32).astype(np.int64)
                                                           - b.view(np.int32).astype(np.int64)))))
    steps = {"ema-avg": int(ours.get_tensor("global_step")), "t2t-style": int(theirs.get_tensor("global_step"))}

    lines = table(f"\noutputs (a) vs (b): max difference {max_ulp_diff} ulp; global_step written: {steps}")
    print("\n".join(lines))
    doc = {"params": vars(args), "input_mib": total_mb, "machine": platform.platform(), "cpus": os.cpu_count(),
           "versions": vers, "table": lines, "median": med, "runs": runs, "max_ulp_diff_a_b": max_ulp_diff, "global_step": steps}
    (base / "results_tf.json").write_text(json.dumps(doc, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
