"""Fuzzed readers: mutated checkpoints either average correctly or fail with the clean
one-line error; never a traceback, hang or crash.

CI runs a bounded number of cases; a longer run:

    EMA_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import io
import json
import os
import struct
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import save_st

EXAMPLES = int(os.environ.get("EMA_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="EMA_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run_in_process(args: list[str]) -> tuple[int, str]:
    """The real entry point, in this process (a crash would take pytest down with it)."""
    from ema_cli.cli import main

    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
    return code, err.getvalue()


def assert_clean(code: int, err: str, out) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code in (1, 2), (code, err)
    assert not os.path.exists(out)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    import ml_dtypes

    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
               "c": np.arange(3, dtype=np.int64), "d": rng.standard_normal(2).astype(np.float16)}
    save_st(d / "good-1.safetensors", tensors)
    return d, (d / "good-1.safetensors").read_bytes()


def check_case(d, data: bytes, name: str) -> None:
    bad = d / f"{name}-2.safetensors"
    bad.write_bytes(data)
    out = d / f"{name}-out.safetensors"
    if out.exists():
        out.unlink()
    code, err = run_in_process([d / "good-1.safetensors", bad, "-o", out])
    if code == 0:
        # a mutation that left a valid file: the result must be the real mean of what it holds
        import ml_dtypes  # noqa: F401
        from safetensors import safe_open

        with safe_open(str(d / "good-1.safetensors"), "numpy") as f1, safe_open(str(bad), "numpy") as f2, \
                safe_open(str(out), "numpy") as fo:
            for k in f1.keys():
                x1, x2, o = f1.get_tensor(k), f2.get_tensor(k), fo.get_tensor(k)
                if x1.dtype.kind == "i":
                    np.testing.assert_array_equal(o, x2)
                else:
                    want = (x1.astype(np.float64) + x2.astype(np.float64)) / 2
                    with np.errstate(all="ignore"):
                        np.testing.assert_array_equal(o.astype(np.float64), want.astype(o.dtype).astype(np.float64))
        out.unlink()
    else:
        assert_clean(code, err, out)


@FUZZ
@given(st.data())
def test_byte_mutations(base, data):
    d, raw = base
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        if not buf:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[i:]
        elif kind == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[i:i + data.draw(st.integers(1, 8))]
        else:
            buf[i] = data.draw(st.integers(0, 255))
    check_case(d, bytes(buf), "bytes")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=8,
)


@FUZZ
@given(st.data())
def test_header_mutations(base, data):
    d, raw = base
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "__whole__", "__metadata__"]))
        if field not in ("__whole__", "__metadata__") and not isinstance(header[name], dict):
            continue
        if field == "__whole__":
            header[name] = data.draw(json_values)
        elif field == "__metadata__":
            header["__metadata__"] = data.draw(json_values)
        elif field == "dtype":
            header[name]["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "BOOL", "X", ""]) | json_values)
        elif field == "shape":
            header[name]["shape"] = data.draw(st.lists(st.integers(-2, 20), max_size=3) | json_values)
        else:
            header[name]["data_offsets"] = data.draw(st.lists(st.integers(-5, len(body) + 5), min_size=2, max_size=2) | json_values)
    hb = json.dumps(header).encode()
    if data.draw(st.booleans()):
        hb += b" " * (-len(hb) % 8)
    check_case(d, struct.pack("<Q", len(hb)) + hb + body, "header")
