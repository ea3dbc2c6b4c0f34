"""Safety under hostile inputs (issue 11): descriptor limits, huge headers,
silent overflow, headers that used to raise internal errors, signals during
start-up, and small items (huge weights, full disks).

Every case runs the real CLI in a subprocess on checkpoints written by the real
libraries (safetensors, huggingface_hub's sharded writer); limits are imposed
on the child with ``resource.setrlimit`` by a small launcher (``run_measured``).
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


# A small launcher between the test and the CLI.  The peak RSS that Linux
# reports for a process (wait4's ru_maxrss) survives exec and starts from the
# image it was forked from: a CLI forked straight from a pytest worker that
# holds TensorFlow and torch "peaks" at the worker's size (631 MB seen in CI
# for a 60 MB run).  The launcher is a fresh interpreter; it sets the limits,
# runs the CLI as its own child and reports that child's peak.
_LAUNCHER = r"""
import os, resource, signal, subprocess, sys
nofile, fsize, report = sys.argv[1:4]
for lim, val in ((resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_FSIZE, fsize)):
    if val != "-":
        resource.setrlimit(lim, (int(val), int(val)))
rc = subprocess.call(sys.argv[4:])
with open(report, "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
if rc < 0:
    signal.signal(-rc, signal.SIG_DFL)
    os.kill(os.getpid(), -rc)
sys.exit(rc)
"""


def run_measured(*args, nofile=None, fsize=None, timeout=600):
    """``python -m ema_cli ARGS`` under resource limits: (result, the CLI's own
    peak RSS in KiB), through ``_LAUNCHER``."""
    env = dict(os.environ)
    env.pop("EMA_AVG_DEBUG", None)
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        report = Path(td) / "maxrss"
        cmd = [sys.executable, "-c", _LAUNCHER, "-" if nofile is None else str(nofile),
               "-" if fsize is None else str(fsize), str(report), sys.executable, "-m", "ema_cli", *map(str, args)]
        with open(os.devnull, "rb") as devnull, open(Path(td) / "out", "w+") as fo, open(Path(td) / "err", "w+") as fe:
            proc = subprocess.Popen(cmd, env=env, stdin=devnull, stdout=fo, stderr=fe, text=True,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(args) from None
            fo.seek(0)
            fe.seek(0)
            rss = int(report.read_text()) if report.exists() else 0
            return _Res(proc.returncode, fo.read(), fe.read()), rss


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


# =========================================================================== B. huge headers


def _big_header_file(path: Path, n: int, seed: int) -> np.ndarray:
    """A safetensors file of n one-element float32 tensors, written with json +
    struct: the safetensors library's ``save_file`` takes ~17 s per 300k-tensor
    file on the CI machine class, longer than the whole test should.  The
    library itself checks the files below (``safe_open`` reads them)."""
    vals = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    header = {f"layers.{i}.w": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + vals.tobytes())
    return vals


@pytest.mark.slow
def test_300k_tensor_headers(tmp_path):
    """Two inputs of 300,000 tensors each (each header ~19 MB): averaged
    correctly, with lean per-tensor memory.  Measured on top of the same run
    with two tensors: about 1,000 bytes per tensor for everything (two readers'
    headers, the plan, the writer's header); before the TensorInfo slots, the
    shared names and shapes and the header parsed without a dict per entry,
    1,750 bytes (and 3.4 times the time)."""
    from safetensors import safe_open

    n = 300_000
    a = _big_header_file(tmp_path / "ckpt-1.safetensors", n, 1)
    b = _big_header_file(tmp_path / "ckpt-2.safetensors", n, 2)
    with safe_open(str(tmp_path / "ckpt-2.safetensors"), "numpy") as f:  # the library accepts the file
        assert len(f.keys()) == n and f.get_tensor("layers.12345.w")[0] == b[12345]
    out = tmp_path / "avg.safetensors"
    res, rss = run_measured(tmp_path / "ckpt-1.safetensors", tmp_path / "ckpt-2.safetensors", "-o", out, "--quiet")
    assert res.code == 0, res
    want = ((a.astype(np.float64) + b) / 2).astype(np.float32)
    with safe_open(str(out), "numpy") as f:
        keys = list(f.keys())
        assert len(keys) == n
        got = np.array([f.get_tensor(f"layers.{i}.w")[0] for i in range(0, n, 997)], dtype=np.float32)
    np.testing.assert_array_equal(got, want[::997])
    _big_header_file(tmp_path / "small-1.safetensors", 2, 1)
    _big_header_file(tmp_path / "small-2.safetensors", 2, 2)
    res0, rss0 = run_measured(tmp_path / "small-1.safetensors", tmp_path / "small-2.safetensors", "-o",
                              tmp_path / "small.safetensors", "--quiet")
    assert res0.code == 0, res0
    per_tensor = (rss - rss0) * 1024 / n
    print(f"peak RSS {rss} KiB, {rss0} KiB for 2 tensors: {per_tensor:.0f} bytes per tensor")
    assert per_tensor < 1300, f"{per_tensor:.0f} bytes per tensor (peak RSS {rss} KiB, {rss0} KiB for 2 tensors)"


def _small_model(rng, k: int) -> dict:
    """600 small tensors of mixed dtypes and shapes (scalars, empty, up to 4K
    elements), in an order that mixes the dtypes: what batching must not reorder."""
    out = {}
    kinds = (np.float32, np.float16, np.float64, np.int64)
    for i in range(600):
        dt = kinds[(i * 7) % len(kinds)]
        shape = [(), (0, 3), (1,), (17,), (64, 64), (3, 5, 7)][i % 6]
        if dt is np.int64:
            out[f"t{i:03d}"] = np.full(shape, i + k, dtype=dt)
        else:
            out[f"t{i:03d}"] = (rng.standard_normal(shape) * (1 + i % 5)).astype(dt)
    return out


def test_small_tensors_in_batches_match_a_float64_reference(tmp_path):
    """Small tensors are summed in batches (one kernel call over a group's
    concatenation): every tensor must still be the float64 weighted sum of its
    own values, in step order, rounded once (numpy's float64 -> float32/float16
    casts round correctly), and integers copied from the newest."""
    rng = np.random.default_rng(7)
    models = [_small_model(rng, k) for k in range(4)]
    ins = [save_st(tmp_path / f"ckpt-{(k + 1) * 100}.safetensors", m) for k, m in enumerate(models)]
    out = tmp_path / "avg.safetensors"
    res = run_cli(*ins, "-o", out, "--decay", "0.7", "--json")
    assert res.code == 0, res
    weights = [c["weight"] for c in res.json()["checkpoints"]]
    got, _ = load_st(out)
    assert sorted(got) == sorted(models[0])
    for name, ref in models[-1].items():
        if ref.dtype == np.int64:
            np.testing.assert_array_equal(got[name], ref, err_msg=name)
            continue
        acc = models[0][name].astype(np.float64) * weights[0]
        for m, w in zip(models[1:], weights[1:]):
            acc = acc + m[name].astype(np.float64) * w
        want = acc.astype(ref.dtype)
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
        np.testing.assert_array_equal(got[name].reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8), err_msg=name)


def test_nan_in_one_small_tensor_of_a_batch_is_named(tmp_path):
    rng = np.random.default_rng(8)
    models = [_small_model(rng, k) for k in range(3)]
    models[1]["t244"] = models[1]["t244"].copy()
    models[1]["t244"].reshape(-1)[5] = np.nan
    assert models[1]["t244"].dtype != np.int64 and models[1]["t244"].size > 5
    ins = [save_st(tmp_path / f"ckpt-{k + 1}.safetensors", m) for k, m in enumerate(models)]
    out = tmp_path / "avg.safetensors"
    assert_clean_error(run_cli(*ins, "-o", out), "ckpt-2.safetensors", "t244", "NaN", code=1)
    assert not out.exists()


# =========================================================================== C. overflow when narrowing


def test_overflow_to_float16_is_an_error_or_saturates(tmp_path):
    for i in (1, 2):
        save_st(tmp_path / f"ckpt-{i}.safetensors", {
            "big": np.array([1.0, 7e4, -7e4], dtype=np.float32), "fine": np.full(3, i, dtype=np.float32)})
    ins = [tmp_path / "ckpt-1.safetensors", tmp_path / "ckpt-2.safetensors"]
    out = tmp_path / "avg.safetensors"
    line = assert_clean_error(run_cli(*ins, "-o", out, "--dtype", "float16"), "tensor 'big'", "7e+04", "float16",
                              "--saturate", code=1)
    assert "inf" in line
    assert not out.exists()
    res = run_cli(*ins, "-o", out, "--dtype", "float16", "--saturate")
    assert res.code == 0, res
    got, _ = load_st(out)
    assert got["big"].dtype == np.float16
    np.testing.assert_array_equal(got["big"], np.array([1.0, 65504, -65504], dtype=np.float16))
    np.testing.assert_array_equal(got["fine"], np.full(3, 1.5, dtype=np.float16))


def test_overflow_to_bfloat16(tmp_path):
    """3.5e38 (float64 inputs) is beyond bfloat16's largest finite value 3.39e38."""
    for i in (1, 2):
        save_st(tmp_path / f"ckpt-{i}.safetensors", {"w": np.array([3.5e38, 2.0], dtype=np.float64)})
    ins = [tmp_path / "ckpt-1.safetensors", tmp_path / "ckpt-2.safetensors"]
    out = tmp_path / "avg.safetensors"
    assert_clean_error(run_cli(*ins, "-o", out, "--dtype", "bfloat16"), "tensor 'w'", "3.5e+38", "bfloat16", code=1)
    res = run_cli(*ins, "-o", out, "--dtype", "bfloat16", "--saturate")
    assert res.code == 0, res
    got, _ = load_st(out)
    top = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    np.testing.assert_array_equal(got["w"].astype(np.float64), [top, 2.0])


def test_overflow_in_a_streamed_tensor(tmp_path):
    """A tensor large enough to be streamed to the writer in chunks; the overflow is in its last chunk."""
    n = 1 << 20
    for i in (1, 2):
        w = np.ones(n, dtype=np.float32)
        w[-1] = 1e5
        save_st(tmp_path / f"ckpt-{i}.safetensors", {"w": w})
    out = tmp_path / "avg.safetensors"
    ins = [tmp_path / "ckpt-1.safetensors", tmp_path / "ckpt-2.safetensors"]
    assert_clean_error(run_cli(*ins, "-o", out, "--dtype", "float16"), "tensor 'w'", "1e+05", code=1)
    assert not out.exists()
    res = run_cli(*ins, "-o", out, "--dtype", "float16", "--saturate")
    assert res.code == 0, res
    got, _ = load_st(out)
    assert got["w"][-1] == np.float16(65504) and np.all(got["w"][:-1] == 1)


# =========================================================================== D. headers that raised internal errors


def _raw_st(path: Path, header, body: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


@pytest.mark.parametrize("case", ["65-dims", "10M-dims", "0x2**64", "2**63x0", "deep-array", "deep-object"])
def test_hostile_headers_are_one_line_errors(tmp_path, case):
    """Both inputs carry the same hostile header (so the agreement check passes
    and the shape reaches numpy): each used to end in 'internal error:
    ValueError' or 'RecursionError'."""
    f32 = {"dtype": "F32", "data_offsets": [0, 4]}
    headers = {
        "65-dims": ({"w": {**f32, "shape": [1] * 65}}, b"\0" * 4),
        "10M-dims": ({"w": {**f32, "shape": [1] * 10**7}}, b"\0" * 4),
        "0x2**64": ({"w": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}, b""),
        "2**63x0": ({"w": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}, b""),
        "deep-array": (b"[" * 200_000 + b"]" * 200_000, b""),
        "deep-object": (b'{"w":' + b"[" * 200_000 + b"]" * 200_000 + b"}", b""),
    }
    header, body = headers[case]
    ins = []
    for i in (1, 2):
        (tmp_path / f"run{i}").mkdir()
        ins.append(_raw_st(tmp_path / f"run{i}" / f"ckpt-{i}.safetensors", header, body))
    out = tmp_path / "avg.safetensors"
    line = assert_clean_error(run_cli(*ins, "-o", out), "ckpt-1.safetensors", code=1)
    assert "internal error" not in line and len(line) < 400, line[:400]
    assert not out.exists()


# =========================================================================== E. signals during start-up


def _importing_numpy(pid: int) -> bool:
    """Whether the process has started loading numpy's C core (/proc/PID/maps):
    it is then importing the CLI's heavy dependencies (numpy, typer, rich),
    past the interpreter's own start-up (site, the venv's .pth files), where
    no code of ours can run yet and a signal gets Python's default behaviour."""
    try:
        return "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig,code,message", [(signal.SIGINT, 130, "error: interrupted"),
                                              (signal.SIGTERM, 143, "error: terminated")])
def test_signal_during_startup_is_one_line(tmp_path, sig, code, message):
    rng = np.random.default_rng(4)
    for i in (1, 2):
        save_st(tmp_path / f"ckpt-{i}.safetensors", {"w": rng.standard_normal((64, 64)).astype(np.float32)})
    env = dict(os.environ)
    env.pop("EMA_AVG_DEBUG", None)
    for delay in (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5):
        out = tmp_path / f"avg-{delay}.safetensors"
        proc = subprocess.Popen([sys.executable, "-m", "ema_cli", tmp_path / "ckpt-1.safetensors",
                                 tmp_path / "ckpt-2.safetensors", "-o", out], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not _importing_numpy(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # the run finished before the signal, or the signal came from its commit on
            assert err == "" and load_st(out)[0].keys() == {"w"}, (delay, err)
            continue
        assert "Traceback" not in err, (delay, err)
        assert err.splitlines() == [message], (delay, err)
        assert proc.returncode == code, (delay, proc.returncode, err)
        assert not out.exists()


# A signal whose handler runs inside a weakref callback (CPython swallows the exception there and
# prints "Exception ignored in ..."; seen in CI: importlib's module-lock callback during the CLI's
# imports, and the run then went on to the end).  WHERE: "import" (just after the CLI's imports) or
# "plan" (after planning, before anything is written).
_SWALLOWED = r"""
import os, signal, sys, weakref
from ema_cli import _entry
where, signum = sys.argv[1], int(sys.argv[2])


class Thing:
    pass


def signal_in_a_weakref_callback():
    t = Thing()

    def cb(ref):
        os.kill(os.getpid(), signum)
        for _ in range(10000):  # the handler runs here, inside the callback
            pass

    r = weakref.ref(t, cb)
    del t
    assert r() is None


if where == "import":
    orig = _entry._import_cli

    def _import_cli():
        m = orig()
        signal_in_a_weakref_callback()
        return m

    _entry._import_cli = _import_cli
else:
    from ema_cli import engine
    orig_plan = engine.make_plan

    def make_plan(*a, **k):
        p = orig_plan(*a, **k)
        signal_in_a_weakref_callback()
        return p

    engine.make_plan = make_plan
sys.argv = ["ema-avg", *sys.argv[3:]]
_entry.main()
"""


@pytest.mark.parametrize("where", ["import", "plan"])
@pytest.mark.parametrize("sig,code,message", [(signal.SIGINT, 130, "error: interrupted"),
                                              (signal.SIGTERM, 143, "error: terminated")])
def test_signal_swallowed_by_python_still_stops_the_run(tmp_path, where, sig, code, message):
    """The interrupt is raised again at the next safe point (the imports done,
    the commit starting): one line, its exit code, nothing at the output."""
    rng = np.random.default_rng(5)
    for i in (1, 2):
        save_st(tmp_path / f"ckpt-{i}.safetensors", {"w": rng.standard_normal((8, 8)).astype(np.float32)})
    out = tmp_path / "avg.safetensors"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    env.pop("EMA_AVG_DEBUG", None)
    p = subprocess.run([sys.executable, "-c", _SWALLOWED, where, str(int(sig)), tmp_path / "ckpt-1.safetensors",
                        tmp_path / "ckpt-2.safetensors", "-o", out], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr.splitlines()) == (code, [message]), p.stderr
    assert not out.exists() and sorted(f.name for f in tmp_path.iterdir()) == ["ckpt-1.safetensors",
                                                                               "ckpt-2.safetensors"]


# =========================================================================== F. small items


def test_huge_weights_no_numpy_warnings(tmp_path):
    for i in (1, 2):
        save_st(tmp_path / f"ckpt-{i}.safetensors", {"w": np.full(3, i, dtype=np.float32)})
    out = tmp_path / "avg.safetensors"
    res = run_cli(tmp_path / "ckpt-1.safetensors", tmp_path / "ckpt-2.safetensors", "-o", out,
                  "--weights", "1e308,1e308")
    assert res.code == 0, res
    assert "RuntimeWarning" not in res.err and "overflow" not in res.err, res
    got, _ = load_st(out)
    np.testing.assert_array_equal(got["w"], np.full(3, 1.5, dtype=np.float32))
    res = run_cli(tmp_path / "ckpt-1.safetensors", tmp_path / "ckpt-2.safetensors", "-o", out, "--force",
                  "--weights", "1e308,-1e308")
    assert "RuntimeWarning" not in res.err, res
    assert_clean_error(res, "--weights", "sum to zero", code=2)


@pytest.mark.parametrize("sharded", [False, True])
def test_full_disk_names_the_output_not_the_staging_path(tmp_path, sharded):
    """A write that fails for lack of space (here: RLIMIT_FSIZE, which fails
    the reservation with EFBIG just as a full disk fails it with ENOSPC)."""
    for i in (1, 2):
        save_st(tmp_path / f"ckpt-{i}.safetensors", {"a": np.ones(100_000, dtype=np.float32),
                                                      "b": np.ones(100_000, dtype=np.float32)})
    out = tmp_path / ("avg" if sharded else "avg.safetensors")
    extra = ["--max-shard-size", "400KB", "--format", "safetensors"] if sharded else []
    res, _ = run_measured(tmp_path / "ckpt-1.safetensors", tmp_path / "ckpt-2.safetensors", "-o", out, *extra,
                          fsize=100_000)
    line = assert_clean_error(res, str(out), code=1)
    assert "ema-avg-" not in line and ".tmp" not in line, line
    assert not out.exists()


def test_header_fast_path_agrees_with_json():
    """The compact-layout parser (no dict per entry) returns exactly what json
    returns, for names with escapes, quotes, non-ASCII and control characters,
    any shapes and offsets; a layout it does not know goes to json."""
    from hypothesis import given, settings, strategies as st

    from ema_cli.formats import safetensors_fmt as sf

    entry = st.tuples(st.text(min_size=1, max_size=12), st.sampled_from(["F32", "BF16", "I64", "F8_E4M3"]),
                      st.lists(st.integers(0, 10**12), max_size=5), st.integers(0, 10**15), st.integers(0, 10**15))
    meta = st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(entry, max_size=8, unique_by=lambda e: e[0]), meta, st.booleans(), st.sampled_from(["", "  "]))
    def check(entries, metadata, compact, pad):
        doc = {} if metadata is None else {"__metadata__": metadata}
        for name, code, shape, b, e in entries:
            if name != "__metadata__":
                doc[name] = {"dtype": code, "shape": shape, "data_offsets": [b, e]}
        text = json.dumps(doc, separators=(",", ":") if compact else (", ", ": ")) + pad
        want = sf._json_entries(text.encode(), "x")
        fast = sf._fast_entries(text)
        if fast is None:
            assert not compact or not doc, text  # the canonical layout must take the fast path
            return
        got_meta, got = fast
        assert (got_meta or None, got) == (want[0] or None, want[1]), text

    check()


def test_read_flat_view_equals_the_concatenation(tmp_path):
    """A batch of neighbours is one zero-copy view of the file; tensors out of
    file order, of another dtype or in another shard fall back to the
    concatenation; both give the values tensor by tensor."""
    from ema_cli.formats.base import Reader, Source
    from ema_cli.formats.safetensors_fmt import SafetensorsReader

    rng = np.random.default_rng(9)
    tensors = {f"t{i}": rng.standard_normal((i % 4, 3)).astype(np.float32) for i in range(12)}
    tensors["h"] = np.ones(5, np.float16)
    path = save_st(tmp_path / "m.safetensors", tensors)
    r = SafetensorsReader(Source("safetensors", str(path), (str(path),)))
    order = list(r.tensors())  # file order
    f32 = [n for n in order if n != "h"]
    for names in (f32, f32[3:7], f32[::-1], f32[::2], [f32[0], "h"], [f32[5]]):
        got = r.read_flat(names)
        want = np.concatenate([r.read(n).reshape(-1) for n in names])
        np.testing.assert_array_equal(got, want, err_msg=str(names))
        assert got.dtype == want.dtype
    assert not r.read_flat(f32[3:7]).flags.owndata  # the neighbours: a view of the mapping
    assert Reader.read_flat(r, f32[3:7]).flags.owndata  # the default: a copy
    r.close()
