"""The weight vectors, checked against the recurrences they stand for (float64)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ema_cli import dtypes, schedule
from ema_cli.errors import UsageError

decays = st.floats(min_value=0.0, max_value=0.9999, allow_nan=False)
counts = st.integers(min_value=1, max_value=40)


@st.composite
def increasing_steps(draw, min_size=1, max_size=30, max_gap=50):
    n = draw(st.integers(min_size, max_size))
    gaps = draw(st.lists(st.integers(1, max_gap), min_size=n, max_size=n))
    start = draw(st.integers(0, 500))
    return np.cumsum([start] + gaps[1:]).astype(np.int64) if n else np.array([], np.int64)


def run_recurrence(xs, decays_, zero_start=False):
    """e_k = b_k e_{k-1} + (1 - b_k) x_k, on scalars, in float64."""
    e = 0.0 if zero_start else xs[0]
    for k, (x, b) in enumerate(zip(xs, decays_)):
        if k == 0 and not zero_start:
            continue
        e = b * e + (1 - b) * x
    return e


def tf32(d, n=None):
    """TF's effective decay: min(...) in float32, then 1 - (float32(1) - decay)."""
    d32 = np.float32(d)
    if n is not None:
        n32 = np.float32(n)
        d32 = min(d32, (np.float32(1) + n32) / (np.float32(10) + n32))
    return 1.0 - float(np.float32(1) - d32)


@settings(max_examples=200, deadline=None)
@given(increasing_steps(), decays, st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_ema_weights_equal_the_recurrence(steps, d, num_updates, zero_debias, seed):
    xs = np.random.default_rng(seed).standard_normal(len(steps))
    w = schedule.ema(steps, d, num_updates=num_updates, zero_debias=zero_debias)
    assert np.all(np.isfinite(w)) and math.isclose(w.sum(), 1.0, rel_tol=1e-12, abs_tol=1e-12)
    b = [tf32(d, s if num_updates else None) for s in steps]
    if zero_debias:
        p = float(np.prod(b))
        if 1 - p < 1e-9:
            return  # debiasing by ~0: ill-posed, the weights are still finite and normalised
        want = run_recurrence(xs, b, zero_start=True) / (1 - p)
    else:
        want = run_recurrence(xs, b)
    assert math.isclose(w @ xs, want, rel_tol=1e-9, abs_tol=1e-9 * (1 + np.abs(xs).max()))


@settings(max_examples=100, deadline=None)
@given(counts, st.integers(0, 2**32 - 1))
def test_mean_and_swa(n, seed):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal(n)
    w = schedule.uniform(n)
    assert math.isclose(w.sum(), 1.0)
    # order does not matter for the mean
    perm = rng.permutation(n)
    assert math.isclose(w @ xs, w @ xs[perm], rel_tol=1e-12, abs_tol=1e-12)
    # SWA's recurrence decay = k/(k+1) is the running mean
    np.testing.assert_allclose(schedule.swa(n), w, rtol=1e-12)
    assert math.isclose(run_recurrence(xs, [k / (k + 1) for k in range(n)]), xs.mean(), rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=20), decays, st.integers(0, 2**32 - 1))
def test_weighted_and_weighted_ema(user, d, seed):
    xs = np.random.default_rng(seed).standard_normal(len(user))
    w = schedule.weighted(user)
    assert math.isclose(w.sum(), 1.0) and math.isclose(w @ xs, np.dot(user, xs) / sum(user), rel_tol=1e-9, abs_tol=1e-12)
    # TF's weighted_moving_average: EMA(x*w)/EMA(w), both from zero
    w2 = schedule.weighted(user, np.arange(len(user)), d)
    b = tf32(d)
    num = run_recurrence([u * x for u, x in zip(user, xs)], [b] * len(user), zero_start=True)
    den = run_recurrence(list(user), [b] * len(user), zero_start=True)
    if den < 1e-300:
        return
    assert math.isclose(w2.sum(), 1.0) and math.isclose(w2 @ xs, num / den, rel_tol=1e-9, abs_tol=1e-9)


def per_step_truth(traj_steps, d):
    """A per-step EMA run literally, step by step, on a per-step trajectory."""
    e = traj_steps[0]
    for x in traj_steps[1:]:
        e = d * e + (1 - d) * x
    return e


@settings(max_examples=60, deadline=None)
@given(increasing_steps(min_size=2, max_size=12, max_gap=20), st.floats(0.5, 0.999), st.sampled_from(["linear", "hold"]),
       st.integers(0, 2**32 - 1))
def test_per_step_ema_equals_the_recurrence_on_the_interpolated_trajectory(steps, d, interp, seed):
    xs = np.random.default_rng(seed).standard_normal(len(steps))
    t = np.arange(steps[0], steps[-1] + 1)
    if interp == "linear":
        traj = np.interp(t, steps, xs)
    else:
        traj = xs[np.searchsorted(steps, t, side="right") - 1]
    w = schedule.ema_per_step(steps, d, interp)
    assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)
    assert math.isclose(w @ xs, per_step_truth(traj, d), rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(increasing_steps(min_size=1, max_size=10, max_gap=30), st.floats(0.0, 20.0), st.integers(0, 2**32 - 1))
def test_power_ema_equals_the_edm2_recurrence(steps, g, seed):
    """EDM2's power EMA run per step: beta_t = (1 - 1/t)^(g+1), from step 1."""
    steps = steps + 1  # positive steps
    xs = np.random.default_rng(seed).standard_normal(len(steps))
    w = schedule.power_per_step(steps, g, "linear")
    assert np.all(np.isfinite(w)) and math.isclose(w.sum(), 1.0, rel_tol=1e-9)
    t = np.arange(1, steps[-1] + 1)
    traj = np.interp(t, steps, xs)  # held at the first checkpoint before it
    e = 0.0
    for k, x in zip(t, traj):
        beta = (1 - 1 / k) ** (g + 1)
        e = beta * e + (1 - beta) * x
    assert math.isclose(w @ xs, e, rel_tol=1e-8, abs_tol=1e-8)


@pytest.mark.parametrize("d", [0.999, 0.9, 0.5, 0.9990234375])
def test_gap_of_one_step_equals_per_checkpoint(d):
    steps = np.arange(100, 140)
    per_step = schedule.Spec(decay=d, decay_per="step").weights_for(steps)
    per_ckpt = schedule.Spec(decay=d).weights_for(steps)
    np.testing.assert_allclose(per_step, per_ckpt, rtol=1e-12, atol=1e-15)
    # uneven gaps with a 1-step gap in between: only the 1-step part is unaffected
    uneven = np.array([0, 1, 2, 10, 11, 30])
    w = schedule.Spec(decay=d, decay_per="step").weights_for(uneven)
    assert math.isclose(w.sum(), 1.0) and np.all(w >= 0)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.001, 0.2886))
def test_sigma_rel_gamma_round_trip(s):
    g = schedule.sigma_rel_to_gamma(s)
    assert math.isclose(schedule.gamma_to_sigma_rel(g), s, rel_tol=1e-9)


def test_sigma_rel_known_values_and_limits():
    assert round(schedule.sigma_rel_to_gamma(0.05), 2) == 16.97
    assert round(schedule.sigma_rel_to_gamma(0.10), 2) == 6.94
    with pytest.raises(UsageError, match="0.2887"):
        schedule.sigma_rel_to_gamma(0.3)
    assert math.isclose(schedule.decay_to_half_life(0.999), 692.8, rel_tol=1e-3)
    assert math.isclose(schedule.half_life_to_decay(693.1), 0.999, rel_tol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.03, 0.25), min_size=1, max_size=3, unique=True), st.floats(0.03, 0.25),
       st.integers(3, 12))
def test_posthoc_weights_normalised_and_exact_on_a_stored_profile(stored, target, n):
    # distinct profiles: two (nearly) equal widths are the same snapshot twice, and
    # least squares may then split the weight between them
    assume(all(abs(a - b) > 0.005 for i, a in enumerate(stored) for b in stored[i + 1:]))
    steps = np.tile(np.arange(1, n + 1) * 100, len(stored))
    gammas = np.repeat([schedule.sigma_rel_to_gamma(s) for s in stored], n)
    w = schedule.posthoc(steps, gammas, steps.max(), schedule.sigma_rel_to_gamma(target))
    assert np.all(np.isfinite(w)) and math.isclose(w.sum(), 1.0, rel_tol=1e-9)
    # asking for a profile that is stored returns (nearly) that snapshot alone
    g0 = gammas[-1]
    w0 = schedule.posthoc(steps, gammas, steps.max(), g0)
    j = int(np.flatnonzero((steps == steps.max()) & (gammas == g0))[0])
    assert abs(w0[j] - 1) < 1e-4


def test_windows_and_top_k():
    steps = np.arange(10, 130, 10)  # 12 checkpoints
    assert schedule.select(steps, last_n=3).tolist() == [9, 10, 11]
    assert schedule.select(steps, start_step=95).tolist() == [9, 10, 11]
    assert schedule.select(steps, every=5).tolist() == [0, 5, 10]
    assert schedule.select(steps, start_step=30, every=4, last_n=2).tolist() == [6, 10]
    vals = [5, 1, 7, 7, 3]
    assert schedule.top_k(vals, 2, maximize=True).tolist() == [2, 3]
    assert schedule.top_k(vals, 2, maximize=False).tolist() == [1, 4]
    assert schedule.top_k([1, 1, 1], 1, maximize=True).tolist() == [2]  # ties: the newer wins


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, width=64), st.sampled_from(["bfloat16", "float8_e4m3fn", "float8_e5m2", "float16"]))
def test_rounding_from_float64_is_correct(v, name):
    """One correct rounding (nearest, ties to even), not ml_dtypes' two (via float32)."""
    from fractions import Fraction

    dt = dtypes.to_numpy(name)
    got = dtypes.cast_rounded(np.array([v]), name)[0]
    fin = ml_dtypes.finfo(dt)
    if abs(v) > float(fin.max) * (1 + float(fin.eps)):  # far beyond the range: saturates or overflows
        return
    g = float(got)
    if not math.isfinite(g):
        return
    cands = [float(np.nextafter(np.array(got, dt), np.array(s, dt))) for s in (np.inf, -np.inf)]
    err = abs(Fraction(g) - Fraction(v))
    for c in cands:
        if math.isfinite(c):
            ec = abs(Fraction(c) - Fraction(v))
            assert err <= ec
            if err == ec and c != g:  # a tie: the even one wins
                bits = np.array(got, dt).view(np.uint8 if dt.itemsize == 1 else np.uint16)
                assert int(bits) % 2 == 0
