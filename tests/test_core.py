"""Issue 2 acceptance: averaging safetensors checkpoints end to end, through the CLI."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURES, assert_clean_error, load_st, run_cli, save_st

DTYPES = {"bf": ml_dtypes.bfloat16, "h": np.float16, "f": np.float32}


def make_run(d, n=12, seed=1, shape=(7, 5)):
    """ckpt-1 .. ckpt-n, steps 10*k, with bf16, f16, f32 and int64 tensors."""
    rng = np.random.default_rng(seed)
    truth = []
    for k in range(1, n + 1):
        t = {
            "bf": (rng.standard_normal(shape) + k * 0.1).astype(ml_dtypes.bfloat16),
            "h": (rng.standard_normal(shape) * 3).astype(np.float16),
            "f": (rng.standard_normal((33,)) * 10.0 ** rng.integers(-3, 3)).astype(np.float32),
            "ids": np.arange(6, dtype=np.int64) * k,
            "global_step": np.array(10 * k, dtype=np.int64),
        }
        save_st(d / f"ckpt-{k}.safetensors", t, metadata={"format": "pt", "k": str(k)})
        truth.append(t)
    return truth


def shell_order(d):
    return sorted(str(p) for p in d.glob("ckpt-*.safetensors"))  # ckpt-1, ckpt-10, ckpt-11, ckpt-12, ckpt-2, ...


# ---------------------------------------------------------------- independent references (float64)


def tf_decay(D, n=None):
    d = np.float32(D)
    if n is not None:
        n = np.float32(n)
        d = min(d, (np.float32(1) + n) / (np.float32(10) + n))
    return float(d)


def ref_ema(xs, decays):
    """The recurrence itself: shadow starts at xs[0]; shadow -= (1-d)(shadow - x)."""
    e = xs[0].astype(np.float64)
    for x, d in zip(xs[1:], decays[1:]):
        e = d * e + (1 - d) * x.astype(np.float64)
    return e


def ref_zero_debias(xs, decays):
    b = np.zeros_like(xs[0], dtype=np.float64)
    p = 1.0
    for x, d in zip(xs, decays):
        b = d * b + (1 - d) * x.astype(np.float64)
        p *= d
    return b / (1 - p)


def ref_weighted_ema(xs, ws, D):
    num = np.zeros_like(xs[0], dtype=np.float64)
    den = 0.0
    for x, w in zip(xs, ws):
        num = D * num + (1 - D) * (x.astype(np.float64) * w)
        den = D * den + (1 - D) * w
    return num / den


def assert_within_one_ulp(out, ref64, dtype):
    """out equals ref64 rounded to dtype, up to one unit in the last place."""
    assert out.dtype == np.dtype(dtype)
    o = out.astype(np.float64)
    r = ref64.astype(dtype).astype(np.float64)
    eps = float(ml_dtypes.finfo(dtype).eps)
    tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
    ulp = np.maximum(eps * 2.0 ** np.floor(np.log2(np.maximum(np.abs(r), tiny))), tiny)
    assert np.all(np.abs(o - r) <= ulp), np.max(np.abs(o - r) / ulp)
    # and nearly always exactly the correctly rounded reference
    assert np.mean(o == r) > 0.95


MODES = {
    "mean": ([], lambda xs, steps: sum(x.astype(np.float64) for x in xs) / len(xs)),
    "decay": (["--decay", "0.8"], lambda xs, steps: ref_ema(xs, [tf_decay(0.8)] * len(xs))),
    "num-updates": (["--decay", "0.95", "--num-updates"],
                    lambda xs, steps: ref_ema(xs, [tf_decay(0.95, s) for s in steps])),
    "zero-debias": (["--decay", "0.7", "--zero-debias"],
                    lambda xs, steps: ref_zero_debias(xs, [tf_decay(0.7)] * len(xs))),
    "weights": (["--weights", ",".join(str(k) for k in range(1, 13))],
                lambda xs, steps: sum(k * x.astype(np.float64) for k, x in zip(range(1, 13), xs)) / 78.0),
    "decay-weights": (["--decay", "0.9", "--weights", ",".join(str(k) for k in range(1, 13))],
                      lambda xs, steps: ref_weighted_ema(xs, list(range(1, 13)), tf_decay(0.9))),
}


@pytest.fixture(scope="module")
def run12(tmp_path_factory):
    d = tmp_path_factory.mktemp("run12")
    return d, make_run(d)


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_match_float64_reference_in_step_order(run12, tmp_path, mode):
    d, truth = run12
    args, ref = MODES[mode]
    out = tmp_path / "avg.safetensors"
    res = run_cli(*shell_order(d), "-o", out, *args, "--json")
    assert res.code == 0, res
    got, meta = load_st(out)
    steps = [10 * k for k in range(1, 13)]
    for name, dt in DTYPES.items():
        assert_within_one_ulp(got[name], ref([t[name] for t in truth], steps), dt)
    # int tensors and the step come from the newest checkpoint, untouched
    np.testing.assert_array_equal(got["ids"], truth[-1]["ids"])
    assert got["global_step"] == 120 and got["global_step"].dtype == np.int64
    # the newest input's metadata is kept, plus the recipe
    assert meta["format"] == "pt" and meta["k"] == "12"
    recipe = json.loads(meta["ema_avg"])
    assert [c["step"] for c in recipe["checkpoints"]] == steps
    # the JSON summary lists inputs in step order with their weights
    doc = res.json()
    assert [c["step"] for c in doc["checkpoints"]] == steps
    assert abs(sum(c["weight"] for c in doc["checkpoints"]) - 1) < 1e-12
    assert doc["tensors"] == {"averaged": 3, "copied": 2, "skipped": []}


def test_output_is_the_float64_weighted_sum_rounded_once(run12, tmp_path):
    """Bit-exact: sum_k w_k x_k accumulated in float64 in step order, rounded once."""
    d, truth = run12
    out = tmp_path / "avg.safetensors"
    res = run_cli(*shell_order(d), "-o", out, "--decay", "0.9", "--num-updates", "--json")
    assert res.code == 0, res
    w = [c["weight"] for c in res.json()["checkpoints"]]
    got, _ = load_st(out)
    for name, dt in DTYPES.items():
        acc = w[0] * truth[0][name].astype(np.float64)
        for wk, t in zip(w[1:], truth[1:]):
            acc = acc + wk * t[name].astype(np.float64)
        # float64 -> bf16 via exact arithmetic: ml_dtypes would round twice (through float32)
        want = np.array([_round_exact(v, dt) for v in acc.reshape(-1)], dtype=dt).reshape(acc.shape)
        assert got[name].tobytes() == want.tobytes(), name


def _round_exact(v: float, dt) -> float:
    """Round a float64 to dt correctly (nearest, ties to even) by comparing neighbours exactly."""
    from fractions import Fraction

    lo = np.array([v], dtype=np.float64).astype(dt)[0]
    cands = {float(lo)}
    for direction in (np.inf, -np.inf):
        cands.add(float(np.nextafter(np.array(lo, dtype=dt), np.array(direction, dtype=dt))))
    fv = Fraction(v)
    best = min(cands, key=lambda c: (abs(Fraction(c) - fv), int(np.array(c, dtype=dt).view(np.uint16 if np.dtype(dt).itemsize == 2 else np.uint32)) & 1))
    return best


def test_fixtures_in_shell_order_are_averaged_in_step_order():
    files = sorted(str(p) for p in (FIXTURES / "safetensors").glob("*.safetensors"))
    assert os.path.basename(files[1]) == "ckpt-10.safetensors"  # the shell's order
    res = run_cli("plan", *files, "--decay", "0.9", "--json", "--quiet")
    assert res.code == 0, res
    cks = res.json()["checkpoints"]
    assert [c["step"] for c in cks] == list(range(100, 1300, 100))
    assert [os.path.basename(c["path"]) for c in cks] == [f"ckpt-{k}.safetensors" for k in range(1, 13)]


def test_step_from_name_when_no_step_tensor(tmp_path):
    rng = np.random.default_rng(0)
    for s in (2, 10, 1):
        save_st(tmp_path / f"step_{s}.safetensors", {"w": rng.standard_normal(3).astype(np.float32)})
    res = run_cli("plan", tmp_path, "--json", "--quiet")
    assert res.code == 0, res
    assert [c["step"] for c in res.json()["checkpoints"]] == [1, 2, 10]
    assert {c["step_from"] for c in res.json()["checkpoints"]} == {"name"}
    res = run_cli("plan", *(tmp_path / f"step_{s}.safetensors" for s in (10, 1, 2)), "--order", "given", "--json", "--quiet")
    assert [c["step"] for c in res.json()["checkpoints"]] == [10, 1, 2]


def test_duplicate_steps_are_an_error(tmp_path):
    for name in ("a-5.safetensors", "b-5.safetensors"):
        save_st(tmp_path / name, {"w": np.ones(2, np.float32)})
    res = run_cli(tmp_path, "-o", tmp_path / "out.safetensors")
    assert_clean_error(res, "same step 5")
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------- sharding


def test_sharded_input_equals_unsharded(tmp_path):
    """The fixture's sharded checkpoint-1200 holds the same tensors as ckpt-12."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st = FIXTURES / "safetensors"
    sharded = FIXTURES / "sharded" / "checkpoint-1200"
    r1 = run_cli(st / "ckpt-10.safetensors", st / "ckpt-11.safetensors", st / "ckpt-12.safetensors", "-o", a, "--decay", "0.5")
    # the index, a directory holding it, or the shard files themselves: one checkpoint
    r2 = run_cli(st / "ckpt-10.safetensors", st / "ckpt-11.safetensors", *sorted(sharded.glob("model-*")), "-o", b, "--decay", "0.5")
    assert r1.code == 0 and r2.code == 0, (r1, r2)
    ta, _ = load_st(a)
    tb, _ = load_st(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].tobytes() == tb[k].tobytes(), k
    r3 = run_cli("plan", sharded, "--json", "--quiet")
    assert r3.code == 0 and len(r3.json()["checkpoints"]) == 1 and r3.json()["checkpoints"][0]["step"] == 1200


def test_max_shard_size_output(tmp_path):
    rng = np.random.default_rng(3)
    for k in range(1, 4):
        save_st(tmp_path / f"c-{k}.safetensors",
                {f"layer{i}/w": rng.standard_normal((64, 64)).astype(np.float32) for i in range(6)}
                | {"step": np.array(k, np.int64)}, metadata={"format": "pt"})
    ins = sorted(tmp_path.glob("c-*.safetensors"))
    single = tmp_path / "single.safetensors"
    outdir = tmp_path / "sharded"
    assert run_cli(*ins, "-o", single).code == 0
    res = run_cli(*ins, "-o", outdir, "--max-shard-size", "40KB", "--format", "safetensors", "--json")
    assert res.code == 0, res
    index = json.loads((outdir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    for s in shards:
        assert (outdir / s).stat().st_size <= 40_000 + 16384 * 2  # one 16 KB tensor may exceed the limit alone
    whole, _ = load_st(single)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in whole.values())
    got = {}
    for s in shards:
        t, meta = load_st(outdir / s)
        assert meta["format"] == "pt"
        got.update(t)
    assert got.keys() == whole.keys()
    for k in whole:
        assert got[k].tobytes() == whole[k].tobytes()
    # and ema-avg reads its own sharded output back as one checkpoint
    res = run_cli("inspect", outdir, "--json", "--quiet")
    assert res.code == 0 and res.json()["totals"]["tensors"] == 7


# ---------------------------------------------------------------- what is averaged


def test_include_exclude_and_dtype(tmp_path):
    for k in range(1, 3):
        save_st(tmp_path / f"c-{k}.safetensors", {
            "w": np.full(3, k, np.float32), "opt/m": np.full(3, 10 * k, np.float32),
            "f8": np.full(2, k, ml_dtypes.float8_e4m3fn), "n": np.array([k], np.int32)})
    ins = sorted(tmp_path.glob("c-*"))
    out = tmp_path / "o.safetensors"
    res = run_cli(*ins, "-o", out, "--exclude", "^opt/")
    assert res.code == 0, res
    t, _ = load_st_raw(out)
    assert t["w"].tolist() == [1.5] * 3 and t["opt/m"].tolist() == [20] * 3  # excluded: copied from newest
    assert t["f8"].dtype == ml_dtypes.float8_e4m3fn and t["f8"].astype(np.float32).tolist() == [2, 2]  # f8 copied
    assert t["n"].tolist() == [2]
    res = run_cli(*ins, "-o", out, "--force", "--dtype", "bfloat16", "--include", "^opt/")
    assert res.code == 0, res
    t, _ = load_st_raw(out)
    assert t["w"].dtype == ml_dtypes.bfloat16 and t["opt/m"].astype(np.float32).tolist() == [15] * 3
    assert t["f8"].dtype == ml_dtypes.bfloat16 and t["f8"].astype(np.float32).tolist() == [1.5, 1.5]
    assert t["n"].dtype == np.int32


def load_st_raw(path):
    """safetensors' numpy API cannot read F8: parse the header and view the raw bytes (NOTES.md 5)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    codes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
             "I32": np.int32, "I64": np.int64, "F64": np.float64}
    out = {}
    for k, e in header.items():
        b, en = e["data_offsets"]
        out[k] = np.frombuffer(raw[8 + n + b: 8 + n + en], dtype=codes[e["dtype"]]).reshape(e["shape"])
    return out, meta


# ---------------------------------------------------------------- bad input


def test_mismatched_inputs_are_clean_errors(tmp_path):
    good = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}
    save_st(tmp_path / "c-1.safetensors", good)
    cases = {
        "names": ({"a": np.ones((2, 3), np.float32), "c": np.ones(4, np.float32)}, ["lacks 1 tensor", "b", "c-2"]),
        "shapes": ({"a": np.ones((3, 2), np.float32), "b": np.ones(4, np.float32)}, ["'a'", "shape [3, 2]", "c-2"]),
        "dtypes": ({"a": np.ones((2, 3), np.float16), "b": np.ones(4, np.float32)}, ["'a'", "float16", "c-2"]),
    }
    out = tmp_path / "out.safetensors"
    for case, (tensors, needles) in cases.items():
        save_st(tmp_path / "c-2.safetensors", tensors)
        res = run_cli(tmp_path / "c-1.safetensors", tmp_path / "c-2.safetensors", "-o", out)
        assert_clean_error(res, *needles)
        assert not out.exists(), case
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], case


def test_nan_is_an_error_unless_allowed(tmp_path):
    save_st(tmp_path / "c-1.safetensors", {"w": np.ones(5, np.float32)})
    save_st(tmp_path / "c-2.safetensors", {"w": np.array([1, 2, np.nan, 4, 5], np.float32)})
    out = tmp_path / "out.safetensors"
    assert_clean_error(run_cli(tmp_path, "-o", out), "c-2.safetensors", "'w'", "NaN")
    assert not out.exists()
    # a NaN on a checkpoint with zero weight is never read
    ins = sorted(tmp_path.glob("c-*"))
    assert run_cli(*ins, "-o", out, "--weights", "1,0").code == 0
    res = run_cli(*ins, "-o", out, "--allow-nonfinite", "--force")
    assert res.code == 0, res
    assert np.isnan(load_st(out)[0]["w"][2])


def test_truncated_file_is_a_clean_error(tmp_path):
    save_st(tmp_path / "c-1.safetensors", {"w": np.ones(100, np.float32)})
    raw = (tmp_path / "c-1.safetensors").read_bytes()
    (tmp_path / "c-2.safetensors").write_bytes(raw[:-40])
    out = tmp_path / "out.safetensors"
    assert_clean_error(run_cli(tmp_path, "-o", out), "c-2.safetensors", "truncated")
    assert not out.exists()


def test_existing_output_needs_force(tmp_path):
    save_st(tmp_path / "c-1.safetensors", {"w": np.ones(3, np.float32)})
    save_st(tmp_path / "c-2.safetensors", {"w": np.zeros(3, np.float32)})
    out = tmp_path / "out"
    out.mkdir()
    target = out / "avg.safetensors"
    target.write_bytes(b"precious")
    res = run_cli(tmp_path / "c-1.safetensors", tmp_path / "c-2.safetensors", "-o", target)
    assert_clean_error(res, "exists", "--force")
    assert target.read_bytes() == b"precious"
    res = run_cli(tmp_path / "c-1.safetensors", tmp_path / "c-2.safetensors", "-o", target, "--force")
    assert res.code == 0
    assert load_st(target)[0]["w"].tolist() == [0.5] * 3


def test_usage_errors(tmp_path):
    save_st(tmp_path / "c-1.safetensors", {"w": np.ones(3, np.float32)})
    save_st(tmp_path / "c-2.safetensors", {"w": np.zeros(3, np.float32)})
    out = tmp_path / "o.safetensors"
    assert_clean_error(run_cli(tmp_path, "-o", out, "--weights", "1,2,3"), "3 values for 2 checkpoints", code=2)
    assert_clean_error(run_cli(tmp_path, "-o", out, "--weights", "1,-1"), "sum to zero", code=2)
    assert_clean_error(run_cli(tmp_path, "-o", out, "--decay", "1.5"), "--decay", code=2)
    assert_clean_error(run_cli(tmp_path, "-o", out, "--num-updates"), "needs --decay", code=2)
    assert_clean_error(run_cli(tmp_path, "-o", tmp_path / "o.txt"), "output format", code=1)
    assert_clean_error(run_cli(tmp_path), "-o", code=2)
    assert not out.exists()


def test_quiet_and_non_terminal_print_nothing(tmp_path):
    save_st(tmp_path / "c-1.safetensors", {"w": np.ones(3, np.float32)})
    save_st(tmp_path / "c-2.safetensors", {"w": np.zeros(3, np.float32)})
    res = run_cli(tmp_path, "-o", tmp_path / "o.safetensors")
    assert res.code == 0 and res.out == "" and res.err == ""


def test_version_and_module_entry_point():
    res = run_cli("--version")
    assert res.code == 0 and res.out.startswith("ema-avg ")
