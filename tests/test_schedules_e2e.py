"""Issue 6 acceptance: per-step, half-life, power and post-hoc EMA from sparse checkpoints,
windows, top-k and ``plan``, through the real CLI on real safetensors files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import assert_clean_error, load_st, run_cli, save_st
from ema_cli.schedule import sigma_rel_to_gamma

T_STEPS, EVERY, DIM = 3000, 60, 256


def sgd_trajectory(T=T_STEPS, dim=DIM, seed=0):
    """Noisy SGD on a quadratic whose minimum drifts: x_{t+1} = x_t - lr (x_t - c_t) + noise."""
    rng = np.random.default_rng(seed)
    x = np.zeros((T + 1, dim))
    c = np.cumsum(rng.standard_normal((T + 1, dim)) * 0.02, axis=0) + np.sin(np.arange(T + 1) / 300.0)[:, None]
    for t in range(T):
        x[t + 1] = x[t] - 0.05 * (x[t] - c[t]) + rng.standard_normal(dim) * 0.05
    return x


def per_step_ema(traj, d):
    e = traj[0].copy()
    for x in traj[1:]:
        e = d * e + (1 - d) * x
    return e


def per_step_power(traj, g):
    """EDM2's power EMA run per step from step 1 (beta_t = (1 - 1/t)^(g+1))."""
    e = np.zeros_like(traj[0])
    for t in range(1, len(traj)):
        beta = (1 - 1 / t) ** (g + 1)
        e = beta * e + (1 - beta) * traj[t]
    return e


def interpolated(traj, steps):
    """The true trajectory seen only at the checkpoints, linearly interpolated in between."""
    t = np.arange(steps[0], steps[-1] + 1)
    return np.stack([np.interp(t, steps, traj[steps, j]) for j in range(traj.shape[1])], axis=1)


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sgd")
    traj = sgd_trajectory()
    steps = np.arange(0, T_STEPS + 1, EVERY)
    for s in steps:
        save_st(d / f"ckpt-{s}.safetensors", {"x": traj[s], "step": np.array(s, np.int64)})  # float64 weights
    return d, traj, steps


def average(d, out, *args):
    res = run_cli(d, "-o", out, "--json", *args)
    assert res.code == 0, res
    return load_st(out)[0]["x"], res.json()


@pytest.mark.parametrize("args,truth_fn,once_decay", [
    (["--decay", "0.995", "--decay-per", "step"], lambda tr: per_step_ema(tr, float(np.float32(0.995))), 0.995),
    (["--half-life", "100"], lambda tr: per_step_ema(tr, 2 ** (-1 / 100)), 2 ** (-1 / 100)),
    (["--sigma-rel", "0.1"], lambda tr: per_step_power(tr, sigma_rel_to_gamma(0.1)), None),
], ids=["decay-per-step", "half-life", "power"])
def test_per_step_schedules_from_sparse_checkpoints(sparse_run, tmp_path, args, truth_fn, once_decay):
    d, traj, steps = sparse_run
    got, doc = average(d, tmp_path / "o.safetensors", *args)
    if args[0] == "--sigma-rel":
        truth = truth_fn(traj)  # covers steps 1..T; the first checkpoint is step 0
        interp_baseline = per_step_power(np.concatenate([traj[:1], interpolated(traj, steps)[1:]]), sigma_rel_to_gamma(0.1))
    else:
        truth = truth_fn(traj[steps[0]:])
        interp_baseline = truth_fn(interpolated(traj, steps))
    err = np.linalg.norm(got - truth)
    err_interp = np.linalg.norm(interp_baseline - truth)
    assert err <= 1.5 * err_interp + 1e-12, (err, err_interp)
    if once_decay is not None:
        # applying the per-step decay once per checkpoint is far worse
        once, _ = average(d, tmp_path / "once.safetensors", "--decay", repr(once_decay))
        err_once = np.linalg.norm(once - truth)
        assert err * 5 < err_once, (err, err_once)
        assert doc["mode"] == "ema-per-step" and doc["params"]["half_life_steps"] > 0


def test_uneven_checkpoints_and_hold(tmp_path):
    traj = sgd_trajectory(T=800, dim=32, seed=3)
    steps = np.array([0, 5, 40, 41, 200, 350, 600, 800])
    for s in steps:
        save_st(tmp_path / f"c-{s}.safetensors", {"x": traj[s]})
    for interp in ("linear", "hold"):
        res = run_cli("plan", tmp_path, "--half-life", "50", "--interp", interp, "--json", "--quiet")
        assert res.code == 0, res
        w = np.array([c["weight"] for c in res.json()["checkpoints"]])
        t = np.arange(steps[0], steps[-1] + 1)
        if interp == "linear":
            tr = np.interp(t, steps, traj[steps, 0])
        else:
            tr = traj[steps, 0][np.searchsorted(steps, t, side="right") - 1]
        want = per_step_ema(tr, 2 ** (-1 / 50))
        assert math.isclose(w @ traj[steps, 0], want, rel_tol=1e-9, abs_tol=1e-12)


def test_posthoc_reconstructs_an_unseen_width(tmp_path):
    """Two power-EMA snapshot series (sigma_rel 0.05, 0.10) kept every 250 steps in float32;
    reconstructing 0.075 at the last step matches the true per-step power EMA."""
    T, dim = 4000, 64
    traj = sgd_trajectory(T=T, dim=dim, seed=5)
    gs = {0.05: sigma_rel_to_gamma(0.05), 0.10: sigma_rel_to_gamma(0.10)}
    ema = {s: np.zeros(dim) for s in gs}
    for s in gs:
        (tmp_path / f"s{s}").mkdir()
    for t in range(1, T + 1):
        for s, g in gs.items():
            beta = (1 - 1 / t) ** (g + 1)
            ema[s] = beta * ema[s] + (1 - beta) * traj[t]
        if t % 250 == 0:
            for s in gs:
                save_st(tmp_path / f"s{s}" / f"snap-{t}.safetensors", {"x": ema[s].astype(np.float32)})
    target = per_step_power(traj, sigma_rel_to_gamma(0.075))
    out = tmp_path / "post.safetensors"
    res = run_cli("posthoc", "--from", f"0.05={tmp_path / 's0.05'}", "--from", f"0.10={tmp_path / 's0.1'}/*.safetensors",
                  "--sigma-rel", "0.075", "-o", out, "--json", "--dtype", "float64")
    assert res.code == 0, res
    got = load_st(out)[0]["x"]
    rel = np.linalg.norm(got - target) / np.linalg.norm(target - traj[T])
    assert rel < 5e-3, rel
    doc = res.json()
    assert doc["mode"] == "posthoc-ema" and len(doc["checkpoints"]) == 32
    assert math.isclose(sum(c["weight"] for c in doc["checkpoints"]), 1.0, rel_tol=1e-9)
    assert doc["sum_abs_weights"] >= 1.0
    # extrapolating below the narrowest stored width warns; at an earlier step, later snapshots are unused
    res = run_cli("posthoc", "--from", f"0.05={tmp_path / 's0.05'}", "--from", f"0.10={tmp_path / 's0.1'}",
                  "--sigma-rel", "0.03", "--at-step", "2000", "-o", tmp_path / "x.safetensors", "--json")
    assert res.code == 0, res
    assert "extrapolation" in res.err
    assert all(c["weight"] == 0 for c in res.json()["checkpoints"] if c["step"] > 2000)


def test_windows_top_k_and_plan_weights(tmp_path):
    for k in range(1, 13):
        save_st(tmp_path / f"ckpt-{k}.safetensors", {"w": np.full(2, k, np.float32), "global_step": np.array(100 * k)})

    def selected(*args):
        res = run_cli("plan", tmp_path, "--json", "--quiet", *args)
        assert res.code == 0, res
        return [c["step"] for c in res.json()["checkpoints"] if c["selected"]], res.json()

    assert selected("--last-n", "3")[0] == [1000, 1100, 1200]
    assert selected("--start-step", "900")[0] == [900, 1000, 1100, 1200]
    assert selected("--every", "4")[0] == [100, 500, 900]
    assert selected("--start-step", "300", "--every", "3", "--last-n", "2")[0] == [900, 1200]
    metrics = tmp_path.parent / f"{tmp_path.name}-metrics.csv"
    metrics.write_text("step,val_loss\n" + "".join(f"{100 * k},{abs(k - 7) + 0.5}\n" for k in range(1, 13)))
    assert selected("--metrics", metrics, "--top-k", "3", "--minimize")[0] == [600, 700, 800]
    mjson = tmp_path.parent / f"{tmp_path.name}-metrics.json"
    mjson.write_text(json.dumps({f"ckpt-{k}.safetensors": k % 5 for k in range(1, 13)}))
    assert selected("--metrics", mjson, "--top-k", "2", "--maximize")[0] == [400, 900]
    assert_clean_error(run_cli("plan", tmp_path, "--metrics", metrics, "--top-k", "3"), "--maximize or --minimize")
    metrics.write_text("step,val_loss\n100,1.0\n")
    assert_clean_error(run_cli("plan", tmp_path, "--metrics", metrics, "--top-k", "1", "--maximize"), "no metric", "ckpt-2")
    # plan --json weights equal the recurrence for --decay
    _, doc = selected("--decay", "0.9")
    w = [c["weight"] for c in doc["checkpoints"]]
    xs = np.random.default_rng(0).standard_normal(12)
    e = xs[0]
    b = 1 - float(np.float32(1) - np.float32(0.9))
    for x in xs[1:]:
        e = b * e + (1 - b) * x
    assert math.isclose(np.dot(w, xs), e, rel_tol=1e-12)
    assert doc["params"]["decay"] == 0.9 and math.isclose(doc["sum_abs_weights"], 1.0)
    # the recipe in the output's metadata uses the same fields as plan
    out = tmp_path.parent / f"{tmp_path.name}-out.safetensors"
    res = run_cli(tmp_path, "-o", out, "--decay", "0.9", "--last-n", "5")
    assert res.code == 0, res
    recipe = json.loads(load_st(out)[1]["ema_avg"])
    assert recipe["mode"] == "ema" and recipe["decay"] == 0.9
    assert [c["step"] for c in recipe["checkpoints"] if c["selected"]] == [800, 900, 1000, 1100, 1200]


def test_plan_warns_about_gaps_and_sigma_rel_limit(tmp_path):
    for s in (0, 1000, 2000):
        save_st(tmp_path / f"c-{s}.safetensors", {"w": np.ones(2, np.float32)})
    res = run_cli("plan", tmp_path, "--half-life", "100")
    assert res.code == 0, res
    assert "exceeds the EMA half-life" in res.err
    assert_clean_error(run_cli("plan", tmp_path, "--sigma-rel", "0.3"), "0.2887", code=2)
    res = run_cli("plan", tmp_path, "--sigma-rel", "0.2", "--start-step", "1000", "--json")
    assert res.code == 0 and "before the first selected" in res.err
