"""bfloat16 end to end as raw bits: safetensors reader -> kernel -> safetensors
writer, without ml_dtypes (``Reader.reads_bits``, ``Writer.writes_bits``,
``execute.for_writer``).

Inputs are written with the real ``safetensors.torch.save_file``; references
are computed here in float64 from torch's bf16 -> float64 widening (exact) and
rounded to bf16 by exact rational arithmetic (tests/test_kernel.py's oracle),
not by the code under test.  Outputs in other formats are read back with their
own libraries (torch.load, TensorFlow, h5py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error, run_cli
from test_kernel import BF16, bf16_bits_of, exact_round

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"big": (1024, 1100), "w": (33, 70), "b": (7,), "c": (5,), "d": (3, 3)}  # big: streamed (>= 1 MiB)


def bits(t: torch.Tensor) -> np.ndarray:
    """A bf16 torch tensor's bits (uint16)."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def ref_bits(x64: np.ndarray) -> np.ndarray:
    """float64 values rounded to bfloat16 bits, exactly (nearest, ties to even)."""
    flat = np.asarray(x64, dtype=np.float64).reshape(-1)
    return np.array([bf16_bits_of(exact_round(v, BF16)) for v in flat.tolist()], dtype=np.uint16).reshape(x64.shape)


def make(d: Path, n: int = 3, seed: int = 0, nan: str | None = None, f32: bool = False) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ts = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
        if not f32:
            ts = {name: t.to(torch.bfloat16) for name, t in ts.items()}
        if nan is not None and k == 1:
            ts[nan].view(-1)[3] = float("nan")
        ts["step"] = torch.tensor(100 * (k + 1))
        p = d / f"ck-{k + 1}.safetensors"
        save_file(ts, str(p), metadata={"format": "pt"})
        paths.append(p)
    return paths


def weights_of(res) -> list[float]:
    return [c["weight"] for c in res.json()["checkpoints"]]


def reference(paths, ws, mean: bool) -> dict[str, np.ndarray]:
    """The float64 recurrence of the kernel (sum then one division for the mean)."""
    ins = [load_file(str(p)) for p in paths]
    out = {}
    for name in SHAPES:
        xs = [t[name].to(torch.float64).numpy() for t in ins]
        if mean:
            acc = xs[0].copy()
            for x in xs[1:]:
                acc = acc + x
            acc = acc / len(xs)
        else:
            acc = xs[0] * ws[0]
            for x, w in zip(xs[1:], ws[1:]):
                acc = acc + x * w
        out[name] = acc
    return out


SUBPROCESS = textwrap.dedent("""
    import atexit, sys
    def report():
        sys.stderr.write("MODULES " + " ".join(m for m in ("ml_dtypes", "tensorflow", "torch")
                                               if m in sys.modules) + "\\n")
    atexit.register(report)
    from ema_cli._entry import main
    main(sys.argv[1:])
""")


def run_tracked(*args) -> tuple[int, str, list[str]]:
    """The CLI in a fresh interpreter; (exit code, stderr, modules of interest it imported)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, stdin=subprocess.DEVNULL)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES")]
    assert len(line) == 1, proc.stderr
    return proc.returncode, proc.stderr, line[0].split()[1:]


@pytest.mark.parametrize("opts,mean", [((), True), (("--decay", "0.9"), False), (("--weights", "1,2,4"), False),
                                       (("--threads", "1"), True)],
                         ids=["mean", "ema", "weighted", "one-thread"])
def test_bf16_average_is_the_rounded_float64_sum_without_ml_dtypes(tmp_path, opts, mean):
    paths = make(tmp_path / "in")
    out = tmp_path / "avg.safetensors"
    code, err, mods = run_tracked(*paths, "-o", out, "--quiet", "--verify", *opts)
    assert code == 0, err
    assert "ml_dtypes" not in mods and "tensorflow" not in mods, mods
    ws = weights_of(run_cli(*paths, "-o", tmp_path / "plan.safetensors", "--json", *opts))
    want = reference(paths, ws, mean)
    got = load_file(str(out))
    for name in SHAPES:
        assert got[name].dtype == torch.bfloat16, name
        assert np.array_equal(bits(got[name]), ref_bits(want[name])), name
    assert int(got["step"]) == 300


def test_bf16_copies_and_small_batches_keep_their_bits_without_ml_dtypes(tmp_path):
    """Copied bf16 tensors (--exclude) are the newest input's bits; small
    neighbours are summed in one batch; the big one streams."""
    paths = make(tmp_path / "in")
    out = tmp_path / "avg.safetensors"
    code, err, mods = run_tracked(*paths, "-o", out, "--quiet", "--verify", "--exclude", "^[cd]$")
    assert code == 0, err
    assert "ml_dtypes" not in mods, mods
    got, newest = load_file(str(out)), load_file(str(paths[-1]))
    for name in ("c", "d"):
        assert np.array_equal(bits(got[name]), bits(newest[name])), name
    want = reference(paths, [1 / 3] * 3, True)
    for name in ("big", "w", "b"):
        assert np.array_equal(bits(got[name]), ref_bits(want[name])), name


def test_dtype_bfloat16_from_float32_without_ml_dtypes(tmp_path):
    paths = make(tmp_path / "in", f32=True)
    out = tmp_path / "avg.safetensors"
    code, err, mods = run_tracked(*paths, "-o", out, "--quiet", "--verify", "--dtype", "bfloat16", "--decay", "0.8")
    assert code == 0, err
    assert "ml_dtypes" not in mods, mods
    ws = weights_of(run_cli(*paths, "-o", tmp_path / "plan.safetensors", "--json", "--dtype", "bf16", "--decay", "0.8"))
    want = reference(paths, ws, False)
    got = load_file(str(out))
    for name in SHAPES:
        assert got[name].dtype == torch.bfloat16
        assert np.array_equal(bits(got[name]), ref_bits(want[name])), name


@pytest.mark.parametrize("name", ["w", "big", "b"], ids=["whole", "streamed", "batched"])
def test_nan_in_a_bf16_input_is_reported_naming_the_tensor(tmp_path, name):
    paths = make(tmp_path / "in", nan=name)
    res = run_cli(*paths, "-o", tmp_path / "avg.safetensors")
    line = assert_clean_error(res, "NaN or Inf")
    assert f"'{name}'" in line or f" {name}" in line or f"{name}:" in line, line
    assert "ck-2" in line, line
    assert not (tmp_path / "avg.safetensors").exists()
    ok = run_cli(*paths, "-o", tmp_path / "avg.safetensors", "--allow-nonfinite", "--quiet")
    assert ok.code == 0, ok
    got = bits(load_file(str(tmp_path / "avg.safetensors"))[name]).reshape(-1)
    assert (got[3] & 0x7FFF) > 0x7F80  # NaN
    assert ((got[:3] & 0x7F80) != 0x7F80).all()


def test_all_finite_on_bf16_bits():
    from ema_cli import dtypes

    assert dtypes.all_finite(np.array([0x3F80, 0x7F7F, 0xFF7F, 0x0001], dtype=np.uint16), "bfloat16")
    for b in (0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF):
        assert not dtypes.all_finite(np.array([0x3F80, b], dtype=np.uint16), "bfloat16"), hex(b)
    # a genuine uint16 tensor is not bfloat16: every value is finite
    assert dtypes.all_finite(np.array([0x7F80], dtype=np.uint16), "uint16")


def test_tf_exact_on_bf16_replays_in_bf16(tmp_path):
    """--tf-exact computes TensorFlow's recurrence on bf16 values (not on bits):
    the oracle is the same recurrence in torch bf16 arithmetic."""
    paths = make(tmp_path / "in")
    out = tmp_path / "avg.safetensors"
    res = run_cli(*paths, "-o", out, "--decay", "0.9", "--tf-exact", "--quiet")
    assert res.code == 0, res
    got = load_file(str(out))
    ins = [load_file(str(p)) for p in paths]
    om = torch.tensor(np.float32(1) - np.float32(0.9)).to(torch.bfloat16)
    for name in SHAPES:
        shadow = ins[0][name].clone()
        for t in ins[1:]:
            shadow = shadow - (shadow - t[name]) * om
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], shadow), name


def test_bf16_safetensors_to_other_formats_same_values(tmp_path):
    """A writer that does not take raw bits (torch, HDF5, TensorFlow) gets the
    same values as the safetensors output (``execute.for_writer``)."""
    paths = make(tmp_path / "in")
    st = tmp_path / "avg.safetensors"
    assert run_cli(*paths, "-o", st, "--quiet", "--decay", "0.95").code == 0
    want = {n: bits(t) for n, t in load_file(str(st)).items() if t.dtype == torch.bfloat16}
    assert set(want) == set(SHAPES)

    pt = tmp_path / "avg.pt"
    res = run_cli(*paths, "-o", pt, "--quiet", "--decay", "0.95", "--verify")
    assert res.code == 0, res
    sd = torch.load(str(pt), weights_only=True)
    for name, b in want.items():
        assert sd[name].dtype == torch.bfloat16 and np.array_equal(bits(sd[name]), b), name

    h5 = tmp_path / "avg.h5"
    res = run_cli(*paths, "-o", h5, "--quiet", "--decay", "0.95", "--verify")
    assert res.code == 0, res
    import h5py

    with h5py.File(str(h5), "r") as f:
        found = {}

        def take(key, obj):  # (returns None: visititems stops at the first other value)
            if isinstance(obj, h5py.Dataset):
                found[key.rsplit("/", 1)[-1]] = obj[()]

        f.visititems(take)
        for name, b in want.items():
            raw = np.asarray(found[name])
            assert raw.dtype.itemsize == 2, (name, raw.dtype)
            assert np.array_equal(raw.view(np.uint16).reshape(b.shape), b), name

    ck = tmp_path / "tf" / "avg.ckpt"
    ck.parent.mkdir()
    res = run_cli(*paths, "-o", ck, "--quiet", "--decay", "0.95", "--verify")
    assert res.code == 0, res
    code = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf, json, sys
        r = tf.train.load_checkpoint({str(ck)!r})
        out = {{}}
        for name, dt in r.get_variable_to_dtype_map().items():
            if dt == tf.bfloat16:
                out[name] = np.asarray(r.get_tensor(name)).view(np.uint16).reshape(-1).tolist()
        sys.stdout.write(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    tf_bits = json.loads(proc.stdout)
    assert set(tf_bits) == set(want), sorted(tf_bits)
    for name, b in want.items():
        assert tf_bits[name] == b.reshape(-1).tolist(), name


def test_safetensors_reader_declares_and_returns_bits(tmp_path):
    from ema_cli import dtypes, formats
    from ema_cli.formats.base import Reader, Source, Writer

    paths = make(tmp_path / "in", n=1)
    r = formats.open_reader(Source("safetensors", str(paths[0]), (str(paths[0]),)))
    try:
        assert type(r).reads_bits and not Reader.reads_bits and not Writer.writes_bits
        assert formats.get("safetensors").writer.writes_bits
        for fmt in ("tf", "hdf5", "torch", "keras"):
            assert not formats.get(fmt).writer.writes_bits, fmt
        assert r.read("w").dtype == np.uint16 and r.read_stream("big").dtype == np.uint16
        assert r.read_flat(["b", "c"]).dtype == np.uint16
        assert dtypes.storage_numpy("bfloat16") == np.uint16 and dtypes.storage_numpy("float32") == np.float32
        assert np.array_equal(r.read("w"), bits(load_file(str(paths[0]))["w"]))
    finally:
        r.close()


def test_watch_bf16_writes_bits(tmp_path):
    """--watch (float64 state, rounded once) on bf16 inputs: the rounded mean's bits."""
    import ema_cli

    paths = make(tmp_path / "in")
    out = tmp_path / "avg.safetensors"
    w = ema_cli.watch(str(tmp_path / "in"), str(out), until_step=300, poll=0.05)
    assert w is not None
    got = load_file(str(out))
    want = reference(paths, None, True)
    for name in SHAPES:
        assert np.array_equal(bits(got[name]), ref_bits(want[name])), name


def test_remote_bf16_reads_raw_bits(tmp_path):
    """The remote reader (ranged reads; ``storage.RangeArray`` windows for large
    tensors) also hands bf16 over as bits: the same output as the local files."""
    fsspec = pytest.importorskip("fsspec")
    import ema_cli

    g = torch.Generator().manual_seed(5)
    local, urls = [], []
    fs = fsspec.filesystem("memory")
    for k in range(3):
        ts = {"huge": torch.randn(4096, 2100, generator=g).to(torch.bfloat16),  # 17 MB: read window by window
              "w": torch.randn(33, 70, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g).to(torch.bfloat16),
              "step": torch.tensor(10 * (k + 1))}
        p = tmp_path / f"r-{k + 1}.safetensors"
        save_file(ts, str(p), metadata={"format": "pt"})
        local.append(str(p))
        fs.pipe_file(f"/bf16bits/r-{k + 1}.safetensors", p.read_bytes())
        urls.append(f"memory://bf16bits/r-{k + 1}.safetensors")
    try:
        ema_cli.average(urls, str(tmp_path / "remote.safetensors"), decay=0.9, verify=True)
    finally:
        fs.rm("/bf16bits", recursive=True)
    ema_cli.average(local, str(tmp_path / "local.safetensors"), decay=0.9)
    a, b = load_file(str(tmp_path / "remote.safetensors")), load_file(str(tmp_path / "local.safetensors"))
    w = ema_cli.plan(local, decay=0.9).weights
    ins = [load_file(p) for p in local]
    for name in ("huge", "w", "b"):
        assert np.array_equal(bits(a[name]), bits(b[name])), name
        if name == "huge":
            continue  # (the exact oracle is slow on 8.6M elements; equal to the local run above)
        acc = ins[0][name].double().numpy() * w[0]
        for t, wk in zip(ins[1:], w[1:]):
            acc = acc + t[name].double().numpy() * wk
        assert np.array_equal(bits(a[name]), ref_bits(acc)), name


@pytest.mark.parametrize("opts", [(), ("--decay", "0.9")], ids=["mean", "ema"])
def test_pure_numpy_kernel_writes_the_same_file(tmp_path, opts):
    """EMA_AVG_PURE_NUMPY=1 (the path of a machine where ema_cli._ckernel was not
    built) writes byte-identical output to the default C kernel, and both are the
    exactly rounded float64 reference."""
    paths = make(tmp_path / "in")
    outs = {}
    for tag, env in (("default", {}), ("numpy", {"EMA_AVG_PURE_NUMPY": "1"})):
        outs[tag] = tmp_path / f"avg-{tag}.safetensors"
        res = run_cli(*paths, "-o", outs[tag], "--quiet", *opts, env=env)
        assert res.code == 0, res
    assert outs["default"].read_bytes() == outs["numpy"].read_bytes()
    ws = weights_of(run_cli(*paths, "-o", tmp_path / "plan.safetensors", "--json", *opts))
    want = reference(paths, ws, not opts)
    got = load_file(str(outs["default"]))
    assert np.array_equal(bits(got["big"]), ref_bits(want["big"]))
