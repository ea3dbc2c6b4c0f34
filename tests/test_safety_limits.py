"""Safety under hostile inputs (issue 11): descriptor limits, huge headers,
silent overflow, headers that used to raise internal errors, signals during
start-up, and small items (huge weights, full disks).

Every case runs the real CLI in a subprocess on checkpoints written by the real
libraries (safetensors, huggingface_hub's sharded writer); limits are imposed
on the child with ``resource.setrlimit`` in ``preexec_fn``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import assert_clean_error, load_st, run_cli, save_st


class _Res:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"<exit {self.code}\nstdout: {self.out[-2000:]}\nstderr: {self.err[-2000:]}>"


def run_measured(*args, nofile=None, fsize=None, timeout=600):
    """``python -m ema_cli ARGS`` with resource limits set in the child
    (``preexec_fn``): (result, the child's own peak RSS in KiB, from wait4)."""

    def limits():
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(os.environ)
    env.pop("EMA_AVG_DEBUG", None)
    with open(os.devnull, "rb") as devnull:
        import tempfile

        with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
            proc = subprocess.Popen([sys.executable, "-m", "ema_cli", *map(str, args)], env=env,
                                    preexec_fn=limits, stdin=devnull, stdout=fo, stderr=fe, text=True)
            deadline = time.monotonic() + timeout
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    os.wait4(proc.pid, 0)
                    raise TimeoutError(args)
                time.sleep(0.02)
            proc.returncode = os.waitstatus_to_exitcode(status)
            fo.seek(0)
            fe.seek(0)
            return _Res(proc.returncode, fo.read(), fe.read()), ru.ru_maxrss


def mean64(arrays):
    return sum(np.asarray(a, dtype=np.float64) for a in arrays) / len(arrays)


# =========================================================================== A. file descriptors


def test_1000_inputs_under_256_descriptors(tmp_path):
    """1,000 single-file inputs with ``ulimit -n 256``: every mapped file used to
    cost a descriptor (Python's mmap keeps a dup), so this failed with 'Too many
    open files' and no file named.  Now mapped files hold none and the reader
    pool keeps at most a quarter of the limit open."""
    n = 1000
    rng = np.random.default_rng(1)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(n):
        save_st(d / f"ckpt-{i + 1}.safetensors", {
            "w": rng.standard_normal((3, 2)).astype(np.float32),
            "b": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
            "step": np.array(i + 1, dtype=np.int64)})
    out = tmp_path / "avg.safetensors"
    res, _rss = run_measured(d, "-o", out, "--quiet", nofile=256)
    assert res.code == 0, res
    got, _ = load_st(out)
    ins = [load_st(d / f"ckpt-{i + 1}.safetensors")[0] for i in range(n)]
    np.testing.assert_array_equal(got["w"], mean64([t["w"] for t in ins]).astype(np.float32))
    np.testing.assert_array_equal(got["b"].astype(np.float64),
                                  mean64([t["b"] for t in ins]).astype(ml_dtypes.bfloat16).astype(np.float64))
    assert int(got["step"]) == n


def _torch_sharded(directory: Path, tensors: dict, shards: int) -> None:
    """A Hugging Face sharded checkpoint written by huggingface_hub's own writer
    (what transformers' save_pretrained calls)."""
    import torch
    from huggingface_hub import save_torch_state_dict

    sd = {k: torch.from_numpy(v) for k, v in tensors.items()}
    per = max(v.nbytes for v in tensors.values())
    save_torch_state_dict(sd, str(directory), max_shard_size=per, safe_serialization=True)
    assert len(list(directory.glob("model-*.safetensors"))) == shards, list(directory.iterdir())


def test_120_sharded_checkpoints_under_256_descriptors(tmp_path):
    """120 checkpoints of 4 shards each (480 files) with ``ulimit -n 256``."""
    n = 120
    rng = np.random.default_rng(2)
    run = tmp_path / "run"
    for i in range(n):
        ck = run / f"checkpoint-{(i + 1) * 10}"
        ck.mkdir(parents=True)
        _torch_sharded(ck, {f"layer{j}.weight": rng.standard_normal((4, 4)).astype(np.float32) for j in range(4)}, 4)
    out = tmp_path / "avg.safetensors"
    res, _rss = run_measured(run, "-o", out, "--quiet", nofile=256)
    assert res.code == 0, res
    got, _ = load_st(out)
    assert sorted(got) == [f"layer{j}.weight" for j in range(4)]
    for name in got:
        ins = []
        for i in range(n):
            ck = run / f"checkpoint-{(i + 1) * 10}"
            index = json.loads((ck / "model.safetensors.index.json").read_text())
            ins.append(load_st(ck / index["weight_map"][name])[0][name])
        np.testing.assert_array_equal(got[name], mean64(ins).astype(np.float32))


def test_5000_inputs(tmp_path):
    """5,000 inputs (more than 4x the usual 1024 descriptors) at the default limits."""
    n = 5000
    d = tmp_path / "in"
    d.mkdir()
    for i in range(n):
        save_st(d / f"ckpt-{i + 1}.safetensors", {"w": np.full(3, i + 1, dtype=np.float32)})
    out = tmp_path / "avg.safetensors"
    t0 = time.perf_counter()
    res, _rss = run_measured(d, "-o", out, "--quiet", nofile=1024)
    took = time.perf_counter() - t0
    assert res.code == 0, res
    got, _ = load_st(out)
    np.testing.assert_array_equal(got["w"], np.full(3, (n + 1) / 2, dtype=np.float32))
    print(f"5000 inputs: {took:.1f} s")


def test_descriptor_limit_really_hit_is_one_line(tmp_path):
    """A limit too small for the inputs (HDF5 readers hold descriptors; with
    ``ulimit -n 6`` only a couple are free once Python runs): one line naming
    the file, the limit and what to do, instead of h5py's bare 'Too many open
    files'."""
    import h5py

    for i in range(3):
        with h5py.File(tmp_path / f"epoch-{i + 1}.h5", "w") as f:
            f["w"] = np.full(3, i, dtype=np.float32)
    res, _ = run_measured(*[tmp_path / f"epoch-{i + 1}.h5" for i in range(3)], "-o", tmp_path / "o.safetensors",
                          nofile=6)
    line = assert_clean_error(res, "too many open files", "ulimit -n is 6", "raise it with 'ulimit -n", code=1)
    assert "epoch-" in line or "o.safetensors" in line, line
    assert not (tmp_path / "o.safetensors").exists()


def test_150_hdf5_inputs_under_256_descriptors(tmp_path):
    """HDF5 readers hold descriptors (h5py's, and the map of the file) and
    HDF5's caches: opened all at once, 150 of them needed ~300 descriptors;
    the pool keeps at most 64 open under ``ulimit -n 256``.  (While a tensor
    is averaged, each HDF5 input's memory map still holds one descriptor:
    see the README.)"""
    import h5py

    n = 150
    for i in range(n):
        with h5py.File(tmp_path / f"epoch-{i + 1}.h5", "w") as f:
            f["dense/kernel"] = np.full((2, 2), i + 1, dtype=np.float32)
            f["dense/bias"] = np.full(2, -(i + 1), dtype=np.float32)
    out = tmp_path / "avg.safetensors"
    res, rss = run_measured(tmp_path, "-o", out, "--quiet", nofile=256)
    assert res.code == 0, res
    got, _ = load_st(out)
    np.testing.assert_array_equal(got["dense/kernel"], np.full((2, 2), (n + 1) / 2, dtype=np.float32))
    np.testing.assert_array_equal(got["dense/bias"], np.full(2, -(n + 1) / 2, dtype=np.float32))
    assert rss < 500 * 1024, f"peak RSS {rss} KiB"
