"""The numeric kernel (ema_cli/kernel.py) against exact rational arithmetic.

Oracles: ``fractions.Fraction`` rounding (nearest, ties to even, IEEE
overflow), and bfloat16 values decoded from their bits by hand.  ml_dtypes
is not the oracle: it rounds float64 -> bfloat16 twice (through float32).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ema_cli import dtypes, kernel
from ema_cli.errors import EmaError

ALL_BF16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)

# (significand bits incl. the implicit one, smallest normal exponent, largest finite)
BF16 = (8, -126, Fraction(2) ** 127 * (2 - Fraction(1, 2**7)))
F16 = (11, -14, Fraction(65504))
F32 = (24, -126, Fraction(2) ** 127 * (2 - Fraction(1, 2**23)))


def decode_bf16(bits: int) -> float:
    """A bfloat16 value from its bits, by the IEEE definition (not through float32)."""
    sign = -1.0 if bits & 0x8000 else 1.0
    e, m = (bits >> 7) & 0xFF, bits & 0x7F
    if e == 0xFF:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * float(Fraction(m, 2**7) * Fraction(2) ** -126)
    return sign * float((1 + Fraction(m, 2**7)) * Fraction(2) ** (e - 127))


def exact_round(x, fmt):
    """x (float or Fraction) rounded to the format: nearest, ties to even; beyond the range: inf."""
    p, emin, top = fmt
    if isinstance(x, float) and not math.isfinite(x):
        return x
    a = abs(Fraction(x))
    neg = x < 0 or (isinstance(x, float) and math.copysign(1.0, x) < 0)
    if a == 0:
        return -0.0 if neg else 0.0
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    ulp = Fraction(2) ** (max(e, emin) - (p - 1))
    q = a / ulp
    n = q.numerator // q.denominator
    r = q - n
    if r > Fraction(1, 2) or (r == Fraction(1, 2) and n % 2):
        n += 1
    v = n * ulp
    out = math.inf if v > top else float(v)
    return -out if neg else out


@pytest.fixture(params=["c", "numpy"])
def impl(request):
    """Run the test on the C kernel (ema_cli/_ckernel.c) and on the pure-numpy path."""
    saved = kernel._C
    if request.param == "numpy":
        kernel._C = None
    elif saved is None:
        pytest.skip("the C kernel is not built or EMA_AVG_PURE_NUMPY is set (test_c_kernel_is_built says which)")
    yield request.param
    kernel._C = saved


FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # impl: set once per test, the same for every example


def bf16_bits_of(v: float) -> int:
    """The bfloat16 bits of a value representable in bfloat16."""
    return int(np.array([v], dtype=np.float32).view(np.uint32)[0] >> 16)


def rounded_bf16(values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    out = np.empty(a.size, dtype=np.uint16)
    kernel.store_rounded(a, out, "bfloat16")
    return out


def check_bf16(values, got_bits):
    for v, g in zip(np.asarray(values, dtype=np.float64).tolist(), got_bits.tolist()):
        if math.isnan(v):
            assert (g & 0x7FFF) > 0x7F80 and g & 0x0040, (v, hex(g))  # a quiet NaN
            continue
        want = exact_round(v, BF16)
        assert g == bf16_bits_of(want), (v.hex(), hex(g), want)


def test_widen_every_bf16_value_exactly():
    got = kernel.widen_bf16(ALL_BF16)
    assert got.dtype == np.float32
    for bits, g in zip(ALL_BF16.tolist(), got.tolist()):
        want = decode_bf16(bits)
        if math.isnan(want):
            assert math.isnan(g)
        else:
            assert g == want and math.copysign(1, g) == math.copysign(1, want), hex(bits)


def test_round_every_bf16_value_and_every_tie(impl):
    """Every bf16 value rounds to itself; every midpoint between neighbours
    (exact ties, in float64 and float32) goes to the even one; one float64 ulp
    either side of a tie goes to the nearer neighbour (the case where rounding
    through float32 first would round twice)."""
    with np.errstate(invalid="ignore"):
        vals = kernel.widen_bf16(ALL_BF16).astype(np.float64)
    fin = np.isfinite(vals)
    assert np.array_equal(rounded_bf16(vals)[fin], ALL_BF16[fin])
    check_bf16(vals[~fin], rounded_bf16(vals[~fin]))
    pos = np.sort(vals[fin & (vals >= 0)])
    pos = np.unique(pos)
    mids = (pos[:-1] + pos[1:]) / 2  # exact in float64
    top = float(BF16[2])
    mids = np.concatenate([mids, [top + (top - float(pos[-2])) / 2]])  # the overflow tie: inf
    ties = np.concatenate([mids, -mids])
    near = np.concatenate([np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)])
    for group in (ties, near):
        check_bf16(group, rounded_bf16(group))
    # float32 sources round from their own bits (cast_rounded of a float32 array)
    t32 = ties.astype(np.float32)
    assert np.array_equal(t32.astype(np.float64), ties)
    got = dtypes.cast_rounded(t32, "bfloat16").view(np.uint16)
    check_bf16(ties, got)


special = st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 2.0**-126, 2.0**-133,
                           2.0**-134, 2.0**-134 * 1.5, 3.3961e38, 3.4e38, 1e300, -1e300])


@settings(max_examples=600, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.lists(st.one_of(st.floats(width=64), st.floats(width=32), special), min_size=1, max_size=40))
def test_round_float64_to_bf16_property(impl, values):
    check_bf16(values, rounded_bf16(values))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40))
def test_round_float32_bits_to_bf16_property(bits):
    """Any float32 (signalling NaNs with any payload, subnormals, max) to bf16."""
    b = np.array(bits, dtype=np.uint32)
    out = np.empty(b.size, dtype=np.uint16)
    kernel.f32_bits_to_bf16(b, out, np.empty_like(b), np.empty(b.size, dtype=np.bool_))
    check_bf16(b.view(np.float32).astype(np.float64), out)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(st.floats(width=64), special, st.floats(-70000, 70000)), min_size=1, max_size=40))
def test_numpy_float64_to_float16_is_correctly_rounded(values):
    """The kernel stores float16 with numpy's cast: check that it rounds once."""
    a = np.array(values, dtype=np.float64)
    out = np.empty(a.size, dtype=np.float16)
    kernel.store_rounded(a, out)
    for v, g in zip(a.tolist(), out.astype(np.float64).tolist()):
        if math.isnan(v):
            assert math.isnan(g)
        else:
            want = exact_round(v, F16)
            assert g == want and math.copysign(1, g) == math.copysign(1, want), (v, g, want)


def test_float16_ties_exhaustive():
    vals = np.unique(np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64))
    vals = vals[np.isfinite(vals)]
    mids = (vals[:-1] + vals[1:]) / 2
    for group in (mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)):
        out = np.empty(group.size, dtype=np.float16)
        kernel.store_rounded(group, out)
        want = np.array([exact_round(v, F16) for v in group.tolist()])
        assert np.array_equal(out.astype(np.float64), want)


# --------------------------------------------------------------------------- the sums


def _sum(srcs, weights, out_dtype, emit=False, **kw):
    n = srcs[0].size
    if out_dtype == "bfloat16":
        out = np.empty(n, dtype=np.uint16)
    else:
        out = np.empty(n, dtype=out_dtype)
    if not emit:
        bad = kernel.block_sum(srcs, weights, out, True, out_dtype=out_dtype, **kw)
        assert bad is None
        return out
    stage = kernel.stage_buffer(out.dtype, min(n, kernel.BLOCK))
    got = np.empty_like(out)

    def put(start, part):
        got[start:start + part.size] = part

    assert kernel.block_sum(srcs, weights, stage, True, put, out_dtype=out_dtype, **kw) is None
    return got


def test_uniform_mean_is_sum_then_divide_at_exact_ties(impl):
    """N = 10 inputs whose exact mean is a bf16 (and a float32) tie: the mean
    rounds to even, as the correctly rounded sum/N does."""
    rng = np.random.default_rng(1)
    n, N = 3000, 10
    base = rng.uniform(1, 2, n).astype(np.float32)
    lo = kernel.widen_bf16((base.view(np.uint32) >> 16).astype(np.uint16)).astype(np.float64)
    tie = lo + np.ldexp(1.0, np.frexp(lo)[1] - 9)  # halfway to the next bf16 value
    xs = [rng.integers(-64, 64, n).astype(np.float64) / 64 + tie for _ in range(N - 1)]
    xs.append(N * tie - sum(xs[1:], xs[0]))  # small dyadic numbers: every sum here is exact
    want = np.array([exact_round(Fraction(float(t)), BF16) for t in tie])
    srcs32 = [x.astype(np.float32) for x in xs]
    assert all(np.array_equal(s.astype(np.float64), x) for s, x in zip(srcs32, xs))
    for srcs in (xs, srcs32):
        for emit in (False, True):
            got = _sum(srcs, [1.0 / N] * N, "bfloat16", emit)
            assert np.array_equal(kernel.widen_bf16(got).astype(np.float64), want)
    # one multiply per term (sum of x/N) lands away from the ties: the test can tell
    weighted = np.zeros(n)
    for x in xs:
        weighted += x * (1.0 / N)
    assert not np.array_equal(rounded_bf16(weighted), rounded_bf16(want))


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.integers(2, 12), st.integers(0, 2**32 - 1), st.sampled_from(["bfloat16", "float16", "float32"]),
       st.sampled_from(["float32", "bfloat16", "float16", "float64"]))
def test_uniform_mean_matches_exact_quotient(impl, N, seed, out_dtype, in_dtype):
    rng = np.random.default_rng(seed)
    n = 50
    xs = [rng.uniform(-4, 4, n) for _ in range(N)]
    if in_dtype == "bfloat16":
        srcs = [rounded_bf16(x) for x in xs]
        vals = [kernel.widen_bf16(s).astype(np.float64) for s in srcs]
    else:
        srcs = [x.astype(in_dtype) for x in xs]
        vals = [s.astype(np.float64) for s in srcs]
    fmt = {"bfloat16": BF16, "float16": F16, "float32": F32}[out_dtype]
    got = _sum(srcs, [1.0 / N] * N, out_dtype, in_dtype=in_dtype)
    got = kernel.widen_bf16(got) if out_dtype == "bfloat16" else got
    for i in range(n):
        exact = sum((Fraction(float(v[i])) for v in vals), Fraction(0)) / N  # the float64 sum is exact here
        assert float(got[i]) == exact_round(exact, fmt), (i, N)


def test_weighted_sum_is_the_float64_recurrence_raw_or_ml_dtypes(impl):
    import ml_dtypes

    rng = np.random.default_rng(2)
    n = 3 * kernel.BLOCK + 17
    xs = [rng.standard_normal(n).astype(ml_dtypes.bfloat16) for _ in range(5)]
    w = list(rng.dirichlet(np.ones(5)))
    ref = xs[0].astype(np.float64) * w[0]
    for x, wk in zip(xs[1:], w[1:]):
        ref = ref + x.astype(np.float64) * wk
    want = rounded_bf16(ref)
    raw = [x.view(np.uint16) for x in xs]
    for emit in (False, True):
        assert np.array_equal(_sum(raw, w, "bfloat16", emit, in_dtype="bfloat16"), want)
        assert np.array_equal(_sum(xs, w, "bfloat16", emit), want)
    f32 = [x.astype(np.float32) for x in xs]
    got = np.empty(n, dtype=np.float32)
    kernel.block_sum(f32, w, got, True)
    assert np.array_equal(got, ref.astype(np.float32))


def test_nonfinite_block_is_reported_and_overflow_is_guarded(impl):
    x = np.ones(kernel.BLOCK * 2, dtype=np.float32)
    y = x.copy()
    y[kernel.BLOCK + 5] = np.nan
    out = np.empty_like(x)
    assert kernel.block_sum([x, y], [0.5, 0.5], out, True) == kernel.BLOCK
    big = np.full(10, 3e38, dtype=np.float32)
    guard = kernel.Narrowing("t", "bfloat16", saturate=False)
    with pytest.raises(EmaError, match="beyond bfloat16's largest finite value"):
        _sum([big, big], [0.7, 0.7], "bfloat16", narrow=guard)
    sat = _sum([big, big], [0.7, 0.7], "bfloat16", narrow=kernel.Narrowing("t", "bfloat16", saturate=True))
    assert (sat == 0x7F7F).all()


def test_store_does_not_allocate_per_block(impl):
    """The rounding store reuses the thread's scratch: no new memory per block."""
    import tracemalloc

    a = np.random.default_rng(3).standard_normal(kernel.BLOCK)
    out = np.empty(kernel.BLOCK, dtype=np.uint16)
    kernel.store_rounded(a, out, "bfloat16", finite=True)  # scratch made here
    tracemalloc.start()
    for _ in range(20):
        kernel.store_rounded(a, out, "bfloat16", finite=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024, peak  # a block's float32 copy alone would be 256 KiB


def test_c_kernel_is_built():
    """The package builds ema_cli._ckernel (a C compiler at install time); without
    it ema-avg runs the numpy path, same bits, slower.  CI must not lose it silently."""
    if os.environ.get("EMA_AVG_PURE_NUMPY"):
        pytest.skip("EMA_AVG_PURE_NUMPY is set")
    assert kernel._C is not None, "ema_cli._ckernel is not built: the bf16 path runs on numpy"


def _is_nan_bf16(bits: np.ndarray) -> np.ndarray:
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x007F) != 0)


def _with_numpy(fn, *args, **kw):
    saved, kernel._C = kernel._C, None
    try:
        return fn(*args, **kw)
    finally:
        kernel._C = saved


@pytest.mark.skipif(kernel._C is None, reason="the C kernel is not built")
@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 9), st.booleans(), st.integers(1, 3 * 1024 + 5))
def test_c_kernel_equals_the_numpy_path_bit_for_bit(seed, N, mean, n):
    """Any bf16 bits (NaNs with payloads, infs, subnormals, zeros of both signs)
    summed with any weights, and any float64 bits rounded (with and without a
    divisor, with and without the NaN pass): the C kernel writes exactly the
    numpy path's bits.  One exception: an element where several inputs are
    NaNs is a NaN in both, but which input's payload and sign survive is not
    defined (an x86 add of two NaNs keeps its first operand's; the compiler
    may put either first, and numpy's own vector and scalar loops differ)."""
    with np.errstate(all="ignore"):  # NaNs and overflows on purpose
        rng = np.random.default_rng(seed)
        srcs = [rng.integers(0, 1 << 16, n, dtype=np.uint16) for _ in range(N)]
        for x in srcs:  # mostly ordinary values, so the sums are not all NaN
            x[rng.random(n) < 0.9] &= 0xBFFF
        w = [1.0 / N] * N if mean else list(rng.standard_normal(N) * 3)
        got, want = np.empty(n, np.uint16), np.empty(n, np.uint16)
        kernel.block_sum(srcs, w, got, False, in_dtype="bfloat16", out_dtype="bfloat16")
        _with_numpy(kernel.block_sum, srcs, w, want, False, in_dtype="bfloat16", out_dtype="bfloat16")
        several = sum(_is_nan_bf16(x).astype(int) for x in srcs) >= 2
        assert np.array_equal(got[~several], want[~several])
        assert _is_nan_bf16(got[several]).all() and _is_nan_bf16(want[several]).all()
        f = rng.integers(0, 1 << 64, n, dtype=np.uint64, endpoint=False).view(np.float64).copy()
        f[: n // 2] = rng.standard_normal(n // 2) * np.exp2(rng.integers(-140, 130, n // 2))  # bf16's range, its edges
        for divisor in (0, N):
            for finite in (False, True):
                src = f if not finite else np.where(np.isnan(f), 1.0, f)
                got, want = np.empty(n, np.uint16), np.empty(n, np.uint16)
                kernel.store_rounded(src, got, "bfloat16", finite=finite, divisor=divisor)
                _with_numpy(kernel.store_rounded, src, want, "bfloat16", finite=finite, divisor=divisor)
                assert np.array_equal(got, want), (divisor, finite)


def test_safetensors_path_imports_neither_ml_dtypes_nor_tensorflow(tmp_path):
    """A whole CLI average of float32/float16 safetensors (and the kernel on
    raw bf16 bits) runs without importing ml_dtypes or TensorFlow (nor torch,
    h5py, the remote-storage and cluster back-ends, nor pydantic: typer's
    coercion of the CLI's plain options is ``ema_cli._typer_plain``'s)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(4)
    for k in range(3):
        save_file({"w": rng.standard_normal((4, 5)).astype(np.float32), "h": rng.standard_normal(7).astype(np.float16),
                   "step": np.array(100 * (k + 1), dtype=np.int64)}, str(tmp_path / f"ck-{k}.safetensors"))
    code = textwrap.dedent(f"""
        import atexit, sys
        def report():
            sys.stderr.write("MODULES " + " ".join(m for m in ("ml_dtypes", "tensorflow", "torch", "fsspec", "dask",
                                                               "distributed", "h5py", "pydantic") if m in sys.modules) + "\\n")
        atexit.register(report)
        import numpy as np
        from ema_cli import kernel
        bits = np.array([0x3f80, 0x4000], dtype=np.uint16)
        out = np.empty(2, dtype=np.uint16)
        kernel.block_sum([bits, bits], [0.5, 0.5], out, True, in_dtype="bfloat16", out_dtype="bfloat16")
        assert out.tolist() == [0x3f80, 0x4000]
        from ema_cli._entry import main
        main([{str(tmp_path / 'ck-*.safetensors')!r}, "-o", {str(tmp_path / 'avg.safetensors')!r}, "--quiet"])
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(__import__("pathlib").Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES")]
    assert line == ["MODULES "], proc.stderr
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "avg.safetensors"))
    ins = [load_file(str(tmp_path / f"ck-{k}.safetensors")) for k in range(3)]
    want = (ins[0]["w"].astype(np.float64) + ins[1]["w"] + ins[2]["w"]) / 3
    assert np.array_equal(got["w"], want.astype(np.float32))


@pytest.mark.slow
def test_install_without_a_c_compiler_runs_the_numpy_kernel(tmp_path):
    """A machine with no C compiler: the package still builds and installs (the
    extension is optional), and ema-avg averages bf16 on the numpy path with the
    same bits as the C kernel here."""
    import glob
    import shutil
    import zipfile

    from safetensors.numpy import load_file

    root = __import__("pathlib").Path(__file__).parents[1]
    src = tmp_path / "src"  # a copy: a build leaves build/ behind, which a later build would reuse
    shutil.copytree(root / "ema_cli", src / "ema_cli", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / f, src / f)
    env = dict(os.environ, CC="/bin/false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "-w",
                           str(tmp_path / "wheels"), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    [wheel] = glob.glob(str(tmp_path / "wheels" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ema_cli/kernel.py" in names and not [n for n in names if n.endswith((".so", ".pyd"))], names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a wheel is a zip of the installed files

    rng = np.random.default_rng(9)
    bits = [rng.integers(0, 1 << 16, (300, 70), dtype=np.uint16) & 0xBFFF for _ in range(3)]
    import torch
    from safetensors.torch import save_file as save_torch

    ins = []
    for k, b in enumerate(bits):  # bf16 files, written by safetensors from torch bf16 tensors
        p = tmp_path / f"ck-{k + 1}.safetensors"
        save_torch({"w": torch.from_numpy(b.view(np.int16)).view(torch.bfloat16)}, str(p))
        ins.append(p)
    # (an editable install of the checkout, as the test command makes, finds ema_cli
    # through a meta-path finder ahead of PYTHONPATH: the installed copy runs without it)
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, '__module__', '')).startswith('__editable')]\n"
            "from ema_cli import kernel\n"
            "assert kernel._C is None and kernel.__file__.startswith(sys.argv.pop(1)), (kernel._C, kernel.__file__)\n"
            "from ema_cli._entry import main\nmain(sys.argv[1:])")
    outs = {}
    for tag, pypath in (("numpy", str(site)), ("here", str(root))):
        outs[tag] = tmp_path / f"avg-{tag}.safetensors"
        run = [sys.executable, "-c", code, str(site), *map(str, ins), "-o", str(outs[tag]), "--quiet"]
        if tag == "here":
            run = [sys.executable, "-m", "ema_cli", *map(str, ins), "-o", str(outs[tag]), "--quiet"]
        proc = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path if tag == "numpy" else root,
                              timeout=120, env=dict(os.environ, PYTHONPATH=pypath))
        assert proc.returncode == 0, proc.stderr
    assert outs["numpy"].read_bytes() == outs["here"].read_bytes()
    assert load_file(str(outs["numpy"]))["w"].shape == (300, 70)
