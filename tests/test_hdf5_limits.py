"""Bounded resources for HDF5 (issue 11 item 5): real h5py files, the real CLI
in a subprocess.

* A sparse HDF5 "bomb" (a 2 GiB chunked dataset whose chunks were never
  written: a 2 KB file) and a compression bomb (zeros, gzip) are refused with a
  one-line error naming the dataset, under an address-space limit that the
  declared size would exceed.
* A 512 MiB contiguous dataset is averaged into an HDF5 output with peak
  anonymous memory far below the tensor size (the writer streams ranges).
* A large gzip chunked dataset that stores its data is averaged without
  holding it in anonymous memory.
* Chunked, compressed, wide and bf16 template datasets written range by range
  hold exactly the float64 reference rounded once.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
import zlib

import h5py
import ml_dtypes
import numpy as np
import pytest

from conftest import CliResult, assert_clean_error, run_cli

# Address-space limit for the bomb runs.  Measured on the dev machine: VmPeak of
# `python -m ema_cli --version` is ~160 MB; averaging two tiny .h5 files (numpy,
# h5py, typer imported; OpenBLAS threads) peaks at ~400 MB of address space.  1 GiB
# leaves ~600 MB of headroom for the real work, and is half of what one bomb
# dataset declares (2 GiB): reading it whole cannot fit.
AS_LIMIT = 1 << 30


def _limited(limit: int):
    def pre():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return pre


def run_limited(*args, limit: int = AS_LIMIT, timeout: int = 300) -> CliResult:
    """run_cli under RLIMIT_AS (a subprocess of its own)."""
    env = dict(os.environ)
    env.pop("EMA_AVG_DEBUG", None)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # per-thread arenas are address space, not work
    proc = subprocess.run([sys.executable, "-m", "ema_cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=_limited(limit))
    return CliResult(proc)


def sparse_bomb(path, step: int, fill: float = 0.0):
    """2 GiB declared (2**29 float32), no chunk ever written: h5py allocates none."""
    with h5py.File(path, "w") as f:
        f.create_dataset("x", shape=(2**29,), dtype="f4", chunks=(2**16,), fillvalue=fill)
        f["step"] = np.int64(step)
    assert os.path.getsize(path) < 16 << 10
    return path


@pytest.mark.parametrize("out", ["avg.h5", "avg.safetensors"])
def test_sparse_bomb_refused_under_memory_limit(tmp_path, out):
    a, b = sparse_bomb(tmp_path / "a.h5", 1), sparse_bomb(tmp_path / "b.h5", 2, fill=1.0)
    with h5py.File(a) as f:
        assert f["x"].id.get_storage_size() == 0  # nothing stored: the premise
    res = run_limited(a, b, "-o", tmp_path / out)
    line = assert_clean_error(res, "'x'", "declares 2147483648 bytes but stores 0", "sparse or corrupt")
    assert "a.h5" in line or "b.h5" in line
    assert not (tmp_path / out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]  # no staging left behind


def test_compression_bomb_refused(tmp_path):
    """Allocated, but 128 MiB of zeros gzip to a few hundred KB: refused the same way."""
    paths = []
    for step in (1, 2):
        p = tmp_path / f"z{step}.h5"
        with h5py.File(p, "w") as f:
            ds = f.create_dataset("z", shape=(2**25,), dtype="f4", chunks=(2**20,), compression="gzip",
                                  compression_opts=1)
            # every chunk written, as h5py's gzip filter stores it (compressed once: fast)
            chunk = zlib.compress(np.zeros(2**20, dtype="f4").tobytes(), 1)
            for i in range(0, 2**25, 2**20):
                ds.id.write_direct_chunk((i,), chunk)
            assert not ds[2**25 - 4:].any()
            stored = ds.id.get_storage_size()
            f["step"] = np.int64(step)
        assert 0 < stored < (2**27) // 16
        paths.append(p)
    res = run_limited(*paths, "-o", tmp_path / "avg.safetensors", limit=AS_LIMIT)
    assert_clean_error(res, "'z'", f"declares {2**27} bytes but stores", "sparse or corrupt")


@pytest.mark.slow
def test_large_stored_chunked_dataset_is_averaged(tmp_path):
    """The refusal is about declared vs stored bytes, not size: an 80 MiB gzip
    chunked dataset that stores its data is averaged, exactly, into a chunked
    output, and is never held in anonymous memory (decoded into a mapped
    temporary file, written range by range)."""
    rng = np.random.default_rng(5)
    vals = []
    for step in (1, 2):
        v = rng.standard_normal((2560, 8192), dtype=np.float32)
        with h5py.File(tmp_path / f"c{step}.h5", "w") as f:
            f.create_dataset("w", data=v, chunks=(256, 1024), compression="gzip", compression_opts=1)
            f["step"] = np.int64(step)
        vals.append(v)
    code, err, peak = run_sampled(tmp_path / "c1.h5", tmp_path / "c2.h5", "-o", tmp_path / "avg.h5")
    assert code == 0, err
    print(f"peak RssAnon {peak / 2**20:.0f} MiB")
    assert 0 < peak < 100 << 20, f"peak RssAnon {peak / 2**20:.0f} MiB for two 80 MiB inputs"
    with h5py.File(tmp_path / "avg.h5") as f:
        w = _weights(f)
        got = f["w"][()]
        assert f["w"].chunks == (256, 1024) and f["w"].compression == "gzip"
    ref = vals[0].astype(np.float64) * w[0] + vals[1].astype(np.float64) * w[1]
    np.testing.assert_array_equal(got, ref.astype(np.float32))


def run_sampled(*args, timeout: int = 300) -> tuple[int, str, int]:
    """The CLI in a subprocess: (exit code, stderr, peak RssAnon in bytes)."""
    env = dict(os.environ)
    env.pop("EMA_AVG_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "ema_cli", *map(str, args), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    sampler = RssSampler(proc.pid)
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr, sampler.stop()


def _weights(f) -> list[float]:
    recipe = json.loads(f.attrs["ema_avg"])
    return [c["weight"] for c in recipe["checkpoints"]]


# --------------------------------------------------------------------------- streaming


class RssSampler:
    """Polls /proc/PID/status of a child for peak RssAnon (anonymous memory:
    mapped file pages do not count), as bench/bench_average.py does."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as fh:
                    for line in fh:
                        if line.startswith("RssAnon:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


ROWS, COLS = 2**14, 2**13  # 2**27 float32: 512 MiB per input


def _write_big(path, seed: int, step: int):
    """A contiguous 512 MiB float32 dataset written by h5py, 32 MiB at a time."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("layers/big/vars/0", shape=(ROWS, COLS), dtype="f4")
        for r in range(0, ROWS, 1024):
            ds[r:r + 1024] = _rows(seed, r, 1024)
        f["step"] = np.int64(step)


def _rows(seed: int, r: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, r]).standard_normal((n, COLS), dtype=np.float32)


@pytest.mark.slow
def test_large_contiguous_tensor_streams_to_hdf5(tmp_path):
    a, b, out = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "avg.h5"
    try:
        _write_big(a, 1, 1)
        _write_big(b, 2, 2)
        code, stderr, peak = run_sampled(a, b, "-o", out)
        assert code == 0, stderr
        tensor = ROWS * COLS * 4
        print(f"peak RssAnon {peak / 2**20:.0f} MiB")
        assert 0 < peak < 200 << 20, f"peak RssAnon {peak / 2**20:.0f} MiB for a {tensor >> 20} MiB tensor"
        with h5py.File(out) as f:
            w = _weights(f)
            ds = f["layers/big/vars/0"]
            assert ds.shape == (ROWS, COLS) and ds.dtype == np.float32
            for r in (0, 1024 * 7, ROWS - 1024):  # whole blocks as written by _write_big
                got = ds[r:r + 1024]
                ref = _rows(1, r, 1024).astype(np.float64) * w[0] + _rows(2, r, 1024).astype(np.float64) * w[1]
                np.testing.assert_array_equal(got, ref.astype(np.float32))
    finally:
        for p in (a, b, out):
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- write_range layouts


def test_write_range_chunked_compressed_bf16_template(tmp_path):
    """Streamed (>= 1 MiB) tensors into template datasets HDF5 must convert,
    chunk or compress: gzip, lzf with one-row chunks, big-endian contiguous,
    chunks too tall to gather, opaque bf16 chunked; also --dtype (rebuilt file)."""
    rng = np.random.default_rng(3)
    vals = []
    for step in (1, 2):
        d = {}
        with h5py.File(tmp_path / f"c{step}.h5", "w") as f:
            d["gz"] = rng.standard_normal((600, 700)).astype("f4")
            f.create_dataset("gz", data=d["gz"], chunks=(64, 100), compression="gzip")
            d["wide"] = rng.standard_normal((1, 1 << 19)).astype("f4")
            f.create_dataset("wide", data=d["wide"], chunks=(1, 1000), compression="lzf")
            d["be"] = rng.standard_normal((300, 1000)).astype(">f4")
            f.create_dataset("be", data=d["be"])
            d["tall"] = rng.standard_normal((2000, 3000)).astype("f4")
            f.create_dataset("tall", data=d["tall"], chunks=(2000, 7))
            d["bf"] = rng.standard_normal((700, 800)).astype(ml_dtypes.bfloat16)
            ds = f.create_dataset("bf", data=d["bf"].view("V2"), chunks=(100, 100))
            ds.attrs["dtype"] = "bfloat16"
            f["step"] = np.int64(step)
        vals.append(d)
    for extra, out in (([], "o.h5"), (["--dtype", "float16", "--threads", "2"], "o16.h5")):
        res = run_cli(tmp_path / "c1.h5", tmp_path / "c2.h5", "-o", tmp_path / out, "--quiet", *extra)
        assert res.code == 0, res
        with h5py.File(tmp_path / out) as f:
            w = _weights(f)
            for k in vals[0]:
                ds = f[k]
                got = ds[()]
                if ds.dtype.kind == "V":
                    assert ds.attrs["dtype"] == "bfloat16"
                    got = got.view(ml_dtypes.bfloat16)
                want = np.float16 if extra else ml_dtypes.bfloat16 if k == "bf" else np.float32
                ref = vals[0][k].astype(np.float64) * w[0] + vals[1][k].astype(np.float64) * w[1]
                np.testing.assert_array_equal(got.astype(np.float64), ref.astype(want).astype(np.float64),
                                              err_msg=k)
                with h5py.File(tmp_path / "c2.h5") as t:
                    assert ds.chunks == t[k].chunks and ds.compression == t[k].compression, k
