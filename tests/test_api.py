"""The Python API (issue 14): every public function in-process, no subprocess,
no SystemExit; results checked against float64 references computed here."""

from __future__ import annotations

import subprocess
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest

import ema_cli
from conftest import FIXTURES, ROOT, load_st, run_cli, save_st

EMA = "ExponentialMovingAverage"


def ema_weights(n: int, d: float) -> np.ndarray:
    """TF's EMA once per checkpoint: w_0 = d^(n-1), w_k = (1-d) d^(n-1-k) (d exact in float32 here)."""
    w = np.array([(1 - d) * d ** (n - 1 - k) for k in range(n)], np.float64)
    w[0] = d ** (n - 1)
    return w


def states(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"layer/kernel": rng.standard_normal((3, 5)).astype(np.float32),
             "layer/bias": rng.standard_normal(5).astype(np.float32),
             "counter": np.array(k, np.int64)} for k in range(n)]


def weighted(sds, w, name):
    return sum(wi * sd[name].astype(np.float64) for wi, sd in zip(w, sds))


@pytest.fixture
def run(tmp_path):
    sds = states()
    files = [save_st(tmp_path / f"ckpt-{(k + 1) * 10}.safetensors", sd) for k, sd in enumerate(sds)]
    return sds, files


def test_import_is_cheap_and_exports_the_api():
    code = ("import sys, ema_cli; heavy = [m for m in ('numpy', 'typer', 'rich', 'safetensors') if m in sys.modules];"
            "print(heavy); from ema_cli import average, plan, posthoc, inspect, restore_map, rename, EmaError, Result;"
            "print(callable(inspect))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split("\n")[:2] == ["[]", "True"]
    assert issubclass(ema_cli.EmaError, Exception) and ema_cli.__version__


def test_average_paths_equals_float64_reference_and_json(run, tmp_path):
    sds, files = run
    out = tmp_path / "avg.safetensors"
    res = ema_cli.average(files[::-1], out, decay=0.5, dtype="fp64")  # any order given: step order used
    assert isinstance(res, ema_cli.Result)
    w = ema_weights(4, 0.5)
    assert res.weights == pytest.approx(list(w), abs=0) and res.mode == "ema"
    got, meta = load_st(out)
    for name in ("layer/kernel", "layer/bias"):
        assert got[name].dtype == np.float64
        np.testing.assert_array_equal(got[name], weighted(sds, w, name))
    assert got["counter"] == 3 and got["counter"].dtype == np.int64  # copied from the newest
    assert res.output == str(out) and res.files == [str(out)] and res.output_dtype == "float64"
    assert res.averaged == 2 and res.copied == 1 and res.verified is False and "ema_avg" in meta
    # the same document as the CLI's --json (timings and the tasks' workers and seconds aside)
    cli = run_cli(*files, "-o", tmp_path / "cli.safetensors", "--decay", "0.5", "--dtype", "float64", "--json").json()
    mine = res.as_dict()
    for doc in (cli, mine):
        doc.pop("timings")
        for t in doc["tasks"]:
            t.pop("worker")
            t.pop("seconds")
        doc.pop("output")
        doc.pop("files")
    assert mine == cli


def test_average_in_memory_state_dicts_and_iterator(tmp_path):
    sds = states(5, seed=1)
    out = tmp_path / "mean.safetensors"
    res = ema_cli.average(sds, out, dtype="float64", verify=True)
    got, _ = load_st(out)
    # the mean is the float64 sum divided once by n (README: Numerics)
    ref = sum(sd["layer/kernel"].astype(np.float64) for sd in sds) / 5
    np.testing.assert_array_equal(got["layer/kernel"], ref)
    assert res.verified and [c.path for c in res.checkpoints] == [f"<memory:step {k}>" for k in range(5)]
    assert got["counter"] == 4

    # an iterator of (step, mapping) is consumed lazily; steps order it, EMA per checkpoint
    consumed = []

    def gen():
        for k, sd in zip((300, 100, 200), sds[:3]):
            consumed.append(k)
            yield k, sd

    out2 = tmp_path / "ema.safetensors"
    res = ema_cli.average(gen(), out2, decay=0.5)
    assert consumed == [300, 100, 200] and [c.step for c in res.checkpoints] == [100, 200, 300]
    got, _ = load_st(out2)
    ordered = [sds[1], sds[2], sds[0]]
    ref = weighted(ordered, ema_weights(3, 0.5), "layer/bias")
    assert got["layer/bias"].dtype == np.float32
    np.testing.assert_array_equal(got["layer/bias"], ref.astype(np.float32))  # rounded once from float64


def test_average_in_memory_torch_tensors_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    sds = [{"w": torch.randn(4, 6, generator=g).to(torch.bfloat16), "b": torch.randn(6, generator=g)[::2]}
           for _ in range(3)]  # bf16, and a non-contiguous view
    out = tmp_path / "t.safetensors"
    res = ema_cli.average(sds, out, weights=[1, 2, 1])
    got, meta = load_st(out)
    assert meta.get("format") == "pt" and res.output_dtype == ["bfloat16", "float32"]
    w = np.array([0.25, 0.5, 0.25])
    ref_w = sum(wi * sd["w"].float().numpy().astype(np.float64) for wi, sd in zip(w, sds))
    assert got["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["w"], ref_w.astype(np.float32).astype(ml_dtypes.bfloat16))
    ref_b = sum(wi * sd["b"].numpy().astype(np.float64) for wi, sd in zip(w, sds))
    np.testing.assert_array_equal(got["b"], ref_b.astype(np.float32))
    # loads back into torch
    from safetensors.torch import load_file

    assert load_file(str(out))["w"].dtype == torch.bfloat16


def test_plan_reads_no_data_and_matches_average(run):
    sds, files = run
    p = ema_cli.plan(files, half_life=10.0)
    assert isinstance(p, ema_cli.Plan) and p.mode == "ema-per-step"
    assert sum(p.weights) == pytest.approx(1.0) and [c.step for c in p.checkpoints] == [10, 20, 30, 40]
    assert p.as_dict()["params"]["half_life"] == 10.0
    p2 = ema_cli.plan(files, select=ema_cli.Select(last_n=2))
    assert p2.weights == [0.5, 0.5] and [c.selected for c in p2.checkpoints] == [False, False, True, True]
    p3 = ema_cli.plan(files, select={"start_step": 30}, mode="swa")
    assert p3.weights == [0.5, 0.5]
    p4 = ema_cli.plan(files[0].parent.glob("ckpt-*.safetensors"))  # a generator of paths
    assert [c.step for c in p4.checkpoints] == [10, 20, 30, 40]


def test_posthoc_weights_reconstruct_the_output(tmp_path):
    rng = np.random.default_rng(3)
    snaps = {}
    for s_rel in (0.05, 0.10):
        d = tmp_path / f"ema{s_rel}"
        d.mkdir()
        for step in (100, 200, 300, 400):
            x = {"w": rng.standard_normal(8).astype(np.float32)}
            save_st(d / f"step_{step}.safetensors", x)
            snaps[(s_rel, step)] = x["w"]
    res = ema_cli.posthoc({0.05: tmp_path / "ema0.05", 0.10: str(tmp_path / "ema0.1" / "*.safetensors")},
                          tmp_path / "ph.safetensors", sigma_rel=0.075, dtype="float64")
    assert res.mode == "posthoc-ema" and sum(res.weights) == pytest.approx(1.0)
    got, _ = load_st(tmp_path / "ph.safetensors")
    ref = np.zeros(8)
    for c in res.checkpoints:
        s_rel = 0.05 if "ema0.05" in c.path else 0.10
        ref += c.weight * snaps[(s_rel, c.step)].astype(np.float64)
    np.testing.assert_allclose(got["w"], ref, rtol=0, atol=1e-12)
    many = ema_cli.posthoc([(0.05, tmp_path / "ema0.05"), (0.10, tmp_path / "ema0.1")],
                           tmp_path / "ph-{sigma_rel}.safetensors", sigma_rel=[0.06, 0.08])
    assert [r.output for r in many] == [str(tmp_path / f"ph-{w}.safetensors") for w in ("0.06", "0.08")]


def test_inspect_restore_map_rename(tmp_path):
    p = save_st(tmp_path / "c.safetensors", {"vars/10": np.zeros(2, np.float32), "vars/2": np.ones(2, np.float32),
                                             f"vars/2/{EMA}": np.full(2, 5, np.float32),
                                             "step": np.array(7, np.int64)})
    rows = ema_cli.inspect(p)
    assert [r.name for r in rows] == ["step", "vars/2", f"vars/2/{EMA}", "vars/10"]
    r = {x.name: x for x in rows}
    assert r[f"vars/2/{EMA}"].role == "shadow" and r[f"vars/2/{EMA}"].shadow_of == "vars/2"
    assert r["vars/10"].shape == (2,) and r["vars/10"].nbytes == 8 and r["step"].role == "copied"

    m = ema_cli.restore_map(p)
    assert m == {f"vars/2/{EMA}": "vars/2", f"vars/10/{EMA}": "vars/10", "step": "step"}

    out = tmp_path / "orig.safetensors"
    rr = ema_cli.rename(p, out, to="original")
    got, _ = load_st(out)
    assert rr.renamed == 1 and rr.names == {f"vars/2/{EMA}": "vars/2"}
    assert sorted(got) == ["step", "vars/10", "vars/2"] and got["vars/2"].tolist() == [5, 5]
    assert rr.as_dict()["output"] == str(out)


def test_errors_are_ema_errors_never_system_exit(run, tmp_path):
    sds, files = run
    missing = tmp_path / "none.safetensors"
    with pytest.raises(ema_cli.EmaError) as ei:
        ema_cli.average([missing], tmp_path / "o.safetensors")
    assert ei.value.path == str(missing) and ei.value.tensor is None
    bad = dict(sds[0], **{"layer/bias": np.zeros(6, np.float32)})
    save_st(tmp_path / "ckpt-50.safetensors", bad)
    with pytest.raises(ema_cli.EmaError) as ei:
        ema_cli.plan([*files, tmp_path / "ckpt-50.safetensors"])
    assert ei.value.tensor == "layer/bias"
    for kwargs in ({"dtype": "int3"}, {"decay": 1.5}, {"mode": "ema"}, {"weights": [1, 2]},
                   {"select": {"bogus": 1}}):
        with pytest.raises(ema_cli.EmaError):
            ema_cli.average(files, tmp_path / "o.safetensors", **kwargs)
    with pytest.raises(ema_cli.EmaError, match="exists"):
        ema_cli.average(files, files[0].parent / "x.safetensors")  # fine
        ema_cli.average(files, files[0].parent / "x.safetensors")  # exists now: refused without force
    with pytest.raises(ema_cli.EmaError, match="not a mix"):
        ema_cli.average([files[0], sds[0]], tmp_path / "m.safetensors")
    with pytest.raises(ema_cli.EmaError, match="twice"):
        ema_cli.average([(1, sds[0]), (1, sds[1])], tmp_path / "m.safetensors")
    with pytest.raises(ema_cli.EmaError) as ei:
        ema_cli.average([{"s": np.array(["a"])}], tmp_path / "m.safetensors")
    assert ei.value.tensor == "s"
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


def test_warnings_and_progress(run, tmp_path):
    sds, files = run
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ema_cli.average(files, tmp_path / "one.safetensors", select={"last_n": 1}, progress=seen.append)
    assert any("only one checkpoint is selected" in w for w in res.warnings)
    assert any(issubclass(c.category, ema_cli.EmaWarning) and "only one" in str(c.message) for c in caught)
    assert seen and seen[-1].tensors_done == seen[-1].tensors_total == 3
    assert seen[-1].bytes_done == seen[-1].bytes_total == res.bytes_written


def test_paths_expand_tilde_and_vars(run, tmp_path, monkeypatch):
    sds, files = run
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CK", str(tmp_path))
    res = ema_cli.average("$CK/ckpt-*.safetensors", "~/h.safetensors")
    assert res.output == str(tmp_path / "h.safetensors") and len(res.checkpoints) == 4


def test_fixture_run_matches_cli(tmp_path):
    """The shipped fixtures: bf16/f16 tensors, a step counter; API and CLI write the same bytes."""
    ins = sorted((FIXTURES / "safetensors").glob("*.safetensors"))
    a = ema_cli.average(ins, tmp_path / "api.safetensors", decay=0.9)
    assert run_cli(*ins, "-o", tmp_path / "cli.safetensors", "--decay", "0.9").code == 0
    ta, _ = load_st(tmp_path / "api.safetensors")
    tc, _ = load_st(tmp_path / "cli.safetensors")
    assert ta.keys() == tc.keys() and all(ta[k].tobytes() == tc[k].tobytes() for k in ta)
    assert a.mode == "ema" and len(a.checkpoints) == 12
