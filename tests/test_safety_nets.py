"""Issue 10 items 2, 4 and 7: steps from the names training tools write, loud safety nets
(nothing averaged, one checkpoint, a dominating weight), and post-hoc EMA that takes
statistics buffers from the newest snapshot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FIXTURES, assert_clean_error, load_st, run_cli, save_st
from ema_cli import steps


# --------------------------------------------------------------------------- steps from names


@pytest.mark.parametrize("name,step,label", [
    ("epoch=3-step=300-val_loss=0.35.ckpt", 300, "step"),
    ("epoch=12-step=1200.ckpt", 1200, "step"),
    ("weights.03-0.35.h5", 3, "number"),  # Keras weights.{epoch:02d}-{val_loss:.2f}.h5
    ("weights.10-1.35.weights.h5", 10, "number"),
    ("global_step=300", 300, "step"),
    ("step_300", 300, "step"),
    ("iter_300.pt", 300, "step"),
    ("it300", 300, "step"),
    ("checkpoint-300", 300, "checkpoint"),
    ("ckpt-300.safetensors", 300, "checkpoint"),
    ("model.ckpt-300.index", 300, "checkpoint"),
    ("checkpoint_12.pt", 12, "checkpoint"),
    ("epoch=7", 7, "epoch"),
    ("epoch_7-val_acc=0.91", 7, "epoch"),
    ("lr1e-4_step5", 5, "step"),
    ("val_loss=0.35", None, ""),
    ("0.35.safetensors", None, ""),
    ("model.safetensors", None, ""),
    ("model-00001-of-00002.safetensors", None, ""),
])
def test_step_from_name(name, step, label):
    got = steps.parse(name)
    assert (got.step, got.label) == (step, label)


def test_several_unlabelled_integers_use_the_first_and_say_so():
    got = steps.parse("run3-42.safetensors")
    assert got.step == 3 and got.note and "first" in got.note


def lightning_like_run(d, n=6, seed=0):
    """Checkpoints named as Lightning's ModelCheckpoint names them (epoch=E-step=S-val_loss=L),
    with losses whose digits sort differently from the steps, and no step counter inside."""
    rng = np.random.default_rng(seed)
    d.mkdir()
    losses = [0.91, 0.35, 0.72, 0.18, 0.55, 0.27]
    order = []
    for e in range(n):
        step = 50 * (e + 1)
        w = (rng.standard_normal((4, 3)) + e).astype(np.float32)
        save_st(d / f"epoch={e}-step={step}-val_loss={losses[e]:.2f}.safetensors", {"layer.weight": w})
        order.append(w)
    return order


def test_lightning_names_are_ordered_by_step_not_by_loss(tmp_path):
    ws = lightning_like_run(tmp_path / "run")
    res = run_cli("plan", tmp_path / "run", "--json", "--quiet", "--decay", "0.6")
    assert res.code == 0, res
    doc = res.json()
    assert [c["step"] for c in doc["checkpoints"]] == [50, 100, 150, 200, 250, 300]
    out = tmp_path / "ema.safetensors"
    res = run_cli(tmp_path / "run", "-o", out, "--decay", "0.6", "--dtype", "float64")
    assert res.code == 0, res
    # TensorFlow's recurrence in step order (decay and 1-decay as float32, as TF computes them)
    d = float(np.float32(0.6))
    om = float(np.float32(1) - np.float32(0.6))
    ref = ws[0].astype(np.float64)
    for w in ws[1:]:
        ref = ref * (1 - om) + om * w.astype(np.float64)
    got = load_st(out)[0]["layer.weight"]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert d  # (decay as TF stores it)


def test_ambiguous_numbers_warn_in_plan(tmp_path):
    for a, b in ((1, 9), (2, 3), (3, 1)):
        save_st(tmp_path / f"run{a}-{b}.safetensors", {"w": np.ones(2, np.float32)})
    res = run_cli("plan", tmp_path)
    assert res.code == 0, res
    assert "none labelled as the step" in res.err


# --------------------------------------------------------------------------- loud safety nets


def test_nothing_averaged_is_an_error_unless_allowed(tmp_path):
    out = tmp_path / "x.safetensors"
    res = run_cli(FIXTURES / "safetensors", "-o", out, "--exclude", ".")
    assert_clean_error(res, "nothing to average", "--allow-copy-only", code=1)
    assert not out.exists()
    assert_clean_error(run_cli("plan", FIXTURES / "safetensors", "--exclude", "."), "nothing to average")
    res = run_cli(FIXTURES / "safetensors", "-o", out, "--exclude", ".", "--allow-copy-only", "--json")
    assert res.code == 0, res
    assert res.json()["tensors"]["averaged"] == 0
    newest = load_st(FIXTURES / "safetensors" / "ckpt-12.safetensors")[0]
    got = load_st(out)[0]
    assert all(np.array_equal(got[k], newest[k]) for k in newest)


def test_only_integer_tensors_is_nothing_to_average(tmp_path):
    for k in (1, 2):
        save_st(tmp_path / f"ckpt-{k}.safetensors", {"ids": np.arange(3) + k, "global_step": np.array(k)})
    res = run_cli(tmp_path, "-o", tmp_path.parent / f"{tmp_path.name}.safetensors")
    assert_clean_error(res, "nothing to average", "other: 2")


def test_one_checkpoint_warns(tmp_path):
    res = run_cli(FIXTURES / "safetensors" / "ckpt-3.safetensors", "-o", tmp_path / "x.safetensors")
    assert res.code == 0, res
    assert "warning: only one checkpoint is selected" in res.err
    res = run_cli("plan", FIXTURES / "safetensors", "--last-n", "1")
    assert res.code == 0 and "only one checkpoint is selected" in res.err
    res = run_cli("plan", FIXTURES / "safetensors", "--last-n", "2")
    assert res.code == 0 and "only one checkpoint" not in res.err


def test_dominating_weight_under_per_checkpoint_decay_warns(tmp_path):
    res = run_cli("plan", FIXTURES / "safetensors", "--decay", "0.99")
    assert res.code == 0, res
    assert "first checkpoint (step 100) carries" in res.err and "--decay-per step" in res.err
    res = run_cli(FIXTURES / "safetensors", "-o", tmp_path / "x.safetensors", "--decay", "0.99")
    assert res.code == 0 and "carries" in res.err
    for args in (["--decay", "0.5"], ["--decay", "0.99", "--decay-per", "step"], ["--half-life", "300"]):
        res = run_cli("plan", FIXTURES / "safetensors", *args)
        assert res.code == 0 and "carries" not in res.err, (args, res)


# --------------------------------------------------------------------------- post-hoc and buffers


def test_posthoc_takes_batchnorm_buffers_from_the_newest_snapshot(tmp_path):
    """A real torch model with BatchNorm trained a few hundred steps, keeping two power-EMA
    series of its state dict (EDM2's way): post-hoc weights are signed, so running_mean /
    running_var must come from the newest snapshot, parameters from the weighted sum."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from ema_cli.schedule import sigma_rel_to_gamma

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gs = {0.05: sigma_rel_to_gamma(0.05), 0.10: sigma_rel_to_gamma(0.10)}
    ema = {s: {k: v.detach().double().clone() for k, v in model.state_dict().items()} for s in gs}
    for s in gs:
        (tmp_path / f"s{s}").mkdir()
    for t in range(1, 201):
        x = torch.randn(16, 6)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sd = model.state_dict()
        for s, g in gs.items():
            beta = (1 - 1 / t) ** (g + 1)
            for k, v in sd.items():
                if v.is_floating_point():
                    ema[s][k] = beta * ema[s][k] + (1 - beta) * v.double()
                else:
                    ema[s][k] = v.clone()
        if t % 40 == 0:
            for s in gs:
                save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in ema[s].items()},
                          str(tmp_path / f"s{s}" / f"snap-{t}.safetensors"))
    out = tmp_path / "post.safetensors"
    res = run_cli("posthoc", "--from", f"0.05={tmp_path / 's0.05'}", "--from", f"0.10={tmp_path / 's0.1'}",
                  "--sigma-rel", "0.04", "-o", out, "--json", "--dtype", "float64")
    assert res.code == 0, res
    assert "statistics buffer(s) taken from the newest" in res.err
    doc = res.json()
    weights = [c["weight"] for c in doc["checkpoints"]]
    assert min(weights) < 0  # extrapolating below 0.05: signed weights
    got = load_st(out)[0]
    newest_path = doc["checkpoints"][-1]["path"]
    newest = load_st(newest_path)[0]
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert np.array_equal(got[k], newest[k].astype(got[k].dtype)), k
    assert (got["1.running_var"] > 0).all()
    snaps = [load_st(c["path"])[0] for c in doc["checkpoints"]]
    for k in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"):
        ref = sum(w * s[k].astype(np.float64) for w, s in zip(weights, snaps))
        np.testing.assert_allclose(got[k], ref, rtol=1e-9, atol=1e-12)
    # the signed weighted sum of the variances is not what was written
    mixed = sum(w * s["1.running_var"].astype(np.float64) for w, s in zip(weights, snaps))
    assert not np.allclose(mixed, got["1.running_var"])
    # the same buffers are averaged by a plain (positive) mean
    res = run_cli(tmp_path / "s0.05", "-o", tmp_path / "mean.safetensors", "--json")
    assert res.code == 0 and "statistics buffer" not in res.err
    assert json.loads(res.out)["tensors"]["averaged"] == 8  # 6 parameters + 2 buffers
