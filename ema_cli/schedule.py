"""Every averaging mode as a function from checkpoint steps to a weight vector.

Any linear recurrence ``e_k = b_k e_{k-1} + (1 - b_k) x_k`` over checkpoints
x_0..x_{N-1} equals ``sum_k w_k x_k`` with ``w_0 = prod_{j>=1} b_j`` and
``w_k = (1 - b_k) prod_{j>k} b_j`` (NOTES.md section 2).  Uniform mean, SWA,
TensorFlow's EMA (with ``num_updates`` and zero-debias), weighted averages,
per-step EMA folded onto sparse checkpoints, power-function EMA and EDM2
post-hoc EMA all reduce to such a vector.  The engine computes the vector
first (float64, before any tensor is read) and then one weighted sum per
tensor.  This module is the only place where averaging math lives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ema_cli.errors import UsageError

SIGMA_REL_MAX = math.sqrt(1 / 12)  # sigma_rel(gamma -> -1): 0.2887


# --------------------------------------------------------------------------- recurrences


def from_decays(b: np.ndarray) -> np.ndarray:
    """Weights of the recurrence whose first element starts the shadow.

    ``b[k]`` is the decay applied when checkpoint k arrives (``b[0]`` unused)."""
    b = np.asarray(b, dtype=np.float64)
    n = len(b)
    w = np.empty(n)
    if n == 0:
        return w
    # suffix[k] = prod_{j>k} b_j, computed backwards
    suffix = np.ones(n)
    for k in range(n - 2, -1, -1):
        suffix[k] = suffix[k + 1] * b[k + 1]
    w[0] = suffix[0]
    w[1:] = (1.0 - b[1:]) * suffix[1:]
    return w


def from_decays_zero_start(b: np.ndarray) -> np.ndarray:
    """Un-normalised weights when the shadow starts at zero and every checkpoint,
    the first included, is an update: ``c_k = (1 - b_k) prod_{j>k} b_j``.
    They sum to ``1 - prod(b)``."""
    b = np.asarray(b, dtype=np.float64)
    n = len(b)
    suffix = np.ones(n)
    for k in range(n - 2, -1, -1):
        suffix[k] = suffix[k + 1] * b[k + 1]
    return (1.0 - b) * suffix


def tf_decays(steps: np.ndarray, decay: float, num_updates: bool) -> np.ndarray:
    """The decay TensorFlow's ExponentialMovingAverage applies at each checkpoint.

    As TF computes it: in float32, ``min(decay, (1 + n) / (10 + n))`` with
    ``n = num_updates`` (the checkpoint's global step).  TF then uses
    ``1 - decay`` in float32, which is exact for decay in [0.5, 1]; so the
    effective float64 decay is the float32 value itself."""
    d = np.full(len(steps), np.float32(decay), dtype=np.float32)
    if num_updates:
        n = np.asarray(steps, dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.minimum(d, (np.float32(1) + n) / (np.float32(10) + n))
    om = np.float32(1) - d  # TF's `1 - decay`, float32
    return 1.0 - om.astype(np.float64)


def normalise(w: np.ndarray, what: str = "weights") -> np.ndarray:
    """``w / sum(w)``, for any finite weights: they are scaled by the largest
    |w| first, so huge weights (``1e308,1e308``) do not overflow the sum and
    tiny ones (``1e-320``) do not lose precision; no numpy warning is printed."""
    w = np.asarray(w, dtype=np.float64)
    if w.size == 0:
        raise UsageError(f"{what}: none given")
    if not np.all(np.isfinite(w)):
        raise UsageError(f"{what} are not finite")
    top = float(np.max(np.abs(w)))
    if top == 0:
        raise UsageError(f"{what} sum to zero")
    with np.errstate(all="raise"):
        try:
            scaled = w / top
            s = scaled.sum()
            if s == 0:
                raise UsageError(f"{what} sum to zero")
            out = scaled / s
        except FloatingPointError:
            # only underflow of relatively negligible weights can get here: recompute quietly
            with np.errstate(all="ignore"):
                scaled = w / top
                s = scaled.sum()
                out = scaled / s if s != 0 else None
            if out is None or not np.all(np.isfinite(out)):
                raise UsageError(f"{what} cannot be normalised (their sum cancels out)") from None
    if not np.all(np.isfinite(out)):
        raise UsageError(f"{what} cannot be normalised (their sum cancels out)")
    return out


# --------------------------------------------------------------------------- per checkpoint


def uniform(n: int) -> np.ndarray:
    """Plain mean; equals SWA (``decay = k/(1+k)`` at the k-th update)."""
    return np.full(n, 1.0 / n)


def swa(n: int) -> np.ndarray:
    """Stochastic weight averaging as a recurrence: b_k = k / (k + 1)."""
    k = np.arange(n, dtype=np.float64)
    return from_decays(k / (k + 1.0))


def ema(steps, decay: float, *, num_updates: bool = False, zero_debias: bool = False) -> np.ndarray:
    """TensorFlow's ExponentialMovingAverage applied once per checkpoint, in order.

    Default: the shadow starts at the first checkpoint, every later one is an
    update.  ``zero_debias``: the shadow starts at zero, every checkpoint is an
    update, and the result is divided by ``1 - prod(decays)``."""
    b = tf_decays(np.asarray(steps), decay, num_updates)
    if zero_debias:
        return normalise(from_decays_zero_start(b), "zero-debiased EMA weights")
    return from_decays(b)


def weighted(user: list[float] | np.ndarray, steps=None, decay: float | None = None,
             num_updates: bool = False) -> np.ndarray:
    """Weighted average; with ``decay``, TensorFlow's ``weighted_moving_average``:
    EMA(x*w) / EMA(w), both from zero, so checkpoint k gets ``w_k c_k``."""
    u = np.asarray(user, dtype=np.float64)
    if decay is None:
        return normalise(u, "--weights")
    b = tf_decays(np.asarray(steps if steps is not None else np.arange(len(u))), decay, num_updates)
    return normalise(u * from_decays_zero_start(b), "weighted EMA weights")


# --------------------------------------------------------------------------- per step

_CHUNK = 1 << 20


def fold_per_step(steps, per_step, interp: str = "linear") -> np.ndarray:
    """Fold per-training-step weights onto checkpoints.

    ``per_step(t)`` gives the weight of the (unknown) weights at integer steps
    ``t`` in ``[steps[0], steps[-1]]``; ``per_step.before`` (optional) is the
    mass on steps before the first checkpoint, which goes to the first one.
    Between checkpoints the trajectory is piecewise linear (``linear``: hat
    functions) or held at the last checkpoint (``hold``).  Works in chunks, so
    memory does not grow with the number of steps."""
    s = np.asarray(steps, dtype=np.int64)
    n = len(s)
    if n == 1:
        return np.ones(1)
    if np.any(np.diff(s) <= 0):
        raise UsageError("per-step schedules need strictly increasing checkpoint steps")
    w = np.zeros(n)
    w[0] += getattr(per_step, "before", 0.0)
    for c0 in range(int(s[0]), int(s[-1]) + 1, _CHUNK):
        t = np.arange(c0, min(c0 + _CHUNK, int(s[-1]) + 1), dtype=np.int64)
        wt = per_step(t)
        seg = np.clip(np.searchsorted(s, t, side="right") - 1, 0, n - 2)
        lo, hi = s[seg], s[seg + 1]
        if interp == "linear":
            lam = (t - lo) / (hi - lo)
        elif interp == "hold":
            lam = (t >= hi).astype(np.float64)
        else:
            raise UsageError(f"unknown --interp {interp!r} (linear or hold)")
        w += np.bincount(seg, weights=wt * (1.0 - lam), minlength=n)
        w += np.bincount(seg + 1, weights=wt * lam, minlength=n)
    return w


def ema_per_step(steps, decay: float, interp: str = "linear") -> np.ndarray:
    """The EMA a per-step update with ``decay`` from the first checkpoint's step
    on would give: shadow = x(s_0), then ``e_t = d e_{t-1} + (1-d) x_t``."""
    s = np.asarray(steps, dtype=np.int64)
    s0, sn = int(s[0]), int(s[-1])
    log_d = math.log(decay) if decay > 0 else -math.inf

    def per_step(t):
        with np.errstate(over="ignore", invalid="ignore"):
            tail = np.exp((sn - t) * log_d) if decay > 0 else (t == sn).astype(np.float64)
        wt = -math.expm1(log_d) * tail if decay > 0 else tail
        return np.where(t == s0, tail, wt)

    return fold_per_step(s, per_step, interp)


def half_life_to_decay(h: float) -> float:
    if not h > 0:
        raise UsageError("--half-life must be a positive number of steps")
    return 2.0 ** (-1.0 / h)


def decay_to_half_life(d: float) -> float:
    return math.log(2) / -math.log(d) if 0 < d < 1 else (math.inf if d >= 1 else 0.0)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2: the power-function exponent with relative standard deviation sigma_rel
    (largest real root of ``g^3 + 7g^2 + (16 - s^-2) g + 12 - s^-2``)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise UsageError(
            f"--sigma-rel must be in (0, {SIGMA_REL_MAX:.4f}): a power-function EMA "
            f"cannot be wider than that (got {sigma_rel})"
        )
    s2 = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    if not gamma > -1:
        raise UsageError(f"--gamma must be greater than -1 (got {gamma})")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_per_step(steps, gamma: float, interp: str = "linear") -> np.ndarray:
    """EDM2's power-function EMA at the last step T: per-step weights
    ``(k/T)^(g+1) - ((k-1)/T)^(g+1)`` for k = 1..T; the mass on steps before
    the first checkpoint goes to it."""
    s = np.asarray(steps, dtype=np.int64)
    T = int(s[-1])
    if T <= 0:
        return uniform(len(s)) if len(s) == 1 else fold_per_step(s, lambda t: (t == T) * 1.0)
    p = gamma + 1.0

    def per_step(t):
        k = t.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = (k / T) ** p * -np.expm1(p * np.log1p(-1.0 / k))
        return np.where(k >= 1, w, 0.0)

    per_step.before = (max(int(s[0]) - 1, 0) / T) ** p
    return fold_per_step(s, per_step, interp)


def power_profile_dot(ta, ga, tb, gb):
    """EDM2's inner product of two power-function EMA profiles."""
    ta, ga, tb, gb = (np.asarray(x, dtype=np.float64) for x in (ta, ga, tb, gb))
    ratio = ta / tb
    expo = np.where(ta < tb, gb, -ga)
    return (ga + 1) * (gb + 1) * ratio ** expo / ((ga + gb + 1) * np.maximum(ta, tb))


def posthoc(snap_steps, snap_gammas, target_step: float, target_gamma: float) -> np.ndarray:
    """EDM2 post-hoc EMA: least-squares coefficients over power-EMA snapshots
    (steps ``snap_steps``, exponents ``snap_gammas``) that best reproduce the
    power EMA with ``target_gamma`` at ``target_step``; normalised to sum 1.
    Snapshots after ``target_step`` must be left out by the caller."""
    t = np.asarray(snap_steps, dtype=np.float64)
    g = np.asarray(snap_gammas, dtype=np.float64)
    if np.any(t <= 0):
        raise UsageError("post-hoc EMA snapshots need positive steps")
    A = power_profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    B = power_profile_dot(t, g, float(target_step), float(target_gamma))
    X = np.linalg.lstsq(A, B, rcond=None)[0]
    return normalise(X, "post-hoc weights")


# --------------------------------------------------------------------------- selection


def select(steps, *, last_n: int | None = None, start_step: int | None = None,
           every: int | None = None) -> np.ndarray:
    """Indices of the checkpoints kept by the windows, applied in this order:
    steps >= start_step, then every k-th (starting with the first), then the last n."""
    idx = np.arange(len(steps))
    s = np.asarray(steps)
    if start_step is not None:
        idx = idx[s[idx] >= start_step]
    if every is not None:
        if every < 1:
            raise UsageError("--every must be at least 1")
        idx = idx[::every]
    if last_n is not None:
        if last_n < 1:
            raise UsageError("--last-n must be at least 1")
        idx = idx[-last_n:]
    return idx


def top_k(values, k: int, maximize: bool) -> np.ndarray:
    """Indices of the k best metric values (ties: the later checkpoint wins), in order."""
    v = np.asarray(values, dtype=np.float64)
    if k < 1:
        raise UsageError("--top-k must be at least 1")
    key = -v if maximize else v
    # stable sort on (key, -index): equal metrics prefer the newer checkpoint
    order = np.lexsort((-np.arange(len(v)), key))
    return np.sort(order[:k])


# --------------------------------------------------------------------------- the spec


@dataclass
class Spec:
    """What the user asked for; ``weights(steps)`` turns it into numbers."""

    swa: bool = False
    decay: float | None = None
    num_updates: bool = False
    zero_debias: bool = False
    weights: list[float] | None = None
    decay_per: str = "checkpoint"
    interp: str = "linear"
    half_life: float | None = None
    sigma_rel: float | None = None
    gamma: float | None = None
    tf_exact: bool = False
    # post-hoc EMA: the power-function exponent of each checkpoint's snapshot series
    posthoc_gammas: list[float] | None = None
    at_step: int | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.decay is not None and not 0 <= self.decay < 1:
            raise UsageError(f"--decay must be in [0, 1) (got {self.decay})")
        if self.decay_per not in ("checkpoint", "step"):
            raise UsageError("--decay-per is 'checkpoint' or 'step'")
        if self.interp not in ("linear", "hold"):
            raise UsageError("--interp is 'linear' or 'hold'")
        picked = [n for n, v in (("--decay", self.decay), ("--half-life", self.half_life),
                                 ("--sigma-rel", self.sigma_rel), ("--gamma", self.gamma)) if v is not None]
        if len(picked) > 1:
            raise UsageError(f"{' and '.join(picked)} cannot be combined: each sets the EMA length")
        if self.swa and (picked or self.weights is not None):
            raise UsageError("--swa is the uniform mean: it takes no --decay, --weights or EMA length")
        if self.num_updates and self.decay is None:
            raise UsageError("--num-updates needs --decay")
        if self.zero_debias and self.decay is None:
            raise UsageError("--zero-debias needs --decay")
        if self.zero_debias and self.weights is not None:
            raise UsageError("--zero-debias cannot be combined with --weights (weighted EMA is never debiased)")
        if self.posthoc_gammas is not None:
            if self.sigma_rel is None and self.gamma is None:
                raise UsageError("posthoc needs the target --sigma-rel (or --gamma)")
            if self.decay is not None or self.half_life is not None or self.weights is not None or self.swa:
                raise UsageError("posthoc takes only a target --sigma-rel/--gamma and --at-step")
        per_step = self.decay_per == "step" or self.half_life is not None or self.sigma_rel is not None or self.gamma is not None
        if per_step and (self.num_updates or self.zero_debias or self.weights is not None):
            raise UsageError("per-step schedules take no --num-updates, --zero-debias or --weights")
        if self.decay_per == "step" and self.decay is None and self.half_life is None:
            raise UsageError("--decay-per step needs --decay or --half-life")
        if self.tf_exact and (self.decay is None or per_step or self.zero_debias or self.weights is not None):
            raise UsageError("--tf-exact replays TensorFlow's recurrence: it needs --decay (optionally --num-updates) and nothing else")
        if self.sigma_rel is not None:
            sigma_rel_to_gamma(self.sigma_rel)
        if self.gamma is not None:
            gamma_to_sigma_rel(self.gamma)

    @property
    def mode(self) -> str:
        if self.posthoc_gammas is not None:
            return "posthoc-ema"
        if self.sigma_rel is not None or self.gamma is not None:
            return "power-ema"
        if self.half_life is not None or (self.decay is not None and self.decay_per == "step"):
            return "ema-per-step"
        if self.decay is not None:
            return "weighted-ema" if self.weights is not None else "ema"
        if self.weights is not None:
            return "weighted"
        return "swa" if self.swa else "mean"

    def weights_for(self, steps) -> np.ndarray:
        """The float64 weight of each (selected, ordered) checkpoint."""
        self.validate()
        steps = np.asarray(steps, dtype=np.int64)
        n = len(steps)
        if self.weights is not None and len(self.weights) != n:
            raise UsageError(f"--weights has {len(self.weights)} values for {n} checkpoints")
        mode = self.mode
        if mode == "posthoc-ema":
            g = self.gamma if self.gamma is not None else sigma_rel_to_gamma(self.sigma_rel)
            target = self.at_step if self.at_step is not None else int(steps.max())
            return posthoc(steps, self.posthoc_gammas, target, g)
        if mode == "power-ema":
            g = self.gamma if self.gamma is not None else sigma_rel_to_gamma(self.sigma_rel)
            return power_per_step(steps, g, self.interp)
        if mode == "ema-per-step":
            # --decay means TensorFlow's decay (float32) in every mode; --half-life is exact
            d = float(tf_decays(steps[:1], self.decay, False)[0]) if self.decay is not None else half_life_to_decay(self.half_life)
            return ema_per_step(steps, d, self.interp)
        if mode == "ema":
            return ema(steps, self.decay, num_updates=self.num_updates, zero_debias=self.zero_debias)
        if mode == "weighted-ema":
            return weighted(self.weights, steps, self.decay, self.num_updates)
        if mode == "weighted":
            return weighted(self.weights)
        return uniform(n)

    def describe(self) -> dict:
        """Parameters as recorded in the recipe and shown by ``plan``."""
        d = {k: v for k, v in asdict(self).items() if v not in (None, False) and k != "extra"}
        d.pop("swa", None)
        if self.mode not in ("ema-per-step", "power-ema"):
            d.pop("interp", None)
        d.pop("decay_per", None)
        if self.mode == "ema-per-step":
            d["decay_per"] = "step"
        if self.mode == "ema-per-step":
            dd = self.decay if self.decay is not None else half_life_to_decay(self.half_life)
            d["decay"] = dd
            d["half_life_steps"] = decay_to_half_life(dd)
        d.pop("posthoc_gammas", None)
        if self.mode in ("power-ema", "posthoc-ema"):
            g = self.gamma if self.gamma is not None else sigma_rel_to_gamma(self.sigma_rel)
            d["gamma"] = g
            d["sigma_rel"] = self.sigma_rel if self.sigma_rel is not None else gamma_to_sigma_rel(g)
        if self.mode == "ema" and self.decay is not None:
            d["half_life_checkpoints"] = decay_to_half_life(self.decay)
        d.update(self.extra)
        return {"mode": self.mode, **d}


# --------------------------------------------------------------------------- TF replay


def tf_replay(arrays, steps, decay: float, num_updates: bool) -> np.ndarray:
    """TensorFlow's ExponentialMovingAverage recurrence replayed bit for bit.

    The one place where averaging is not a float64 weighted sum: the shadow
    starts at ``arrays[0]``; each later checkpoint applies
    ``shadow = shadow - (shadow - x) * om`` with ``om = float32(1) - decay_k``
    cast to the variable's dtype, every operation rounded in that dtype, as
    ``assign_moving_average`` does (NOTES.md section 1)."""
    dt = np.asarray(arrays[0]).dtype
    om32 = (np.float32(1) - tf_decays(np.asarray(steps), decay, num_updates).astype(np.float32))
    shadow = np.array(arrays[0], dtype=dt, copy=True)
    for x, om in zip(arrays[1:], om32[1:]):
        o = np.asarray(om, dtype=np.float32).astype(dt)
        diff = np.subtract(shadow, np.asarray(x, dtype=dt))
        np.multiply(diff, o, out=diff)
        np.subtract(shadow, diff, out=shadow)
    return shadow


# --------------------------------------------------------------------------- diagnostics


def uses_steps(spec: Spec) -> bool:
    """Whether the weights depend on the checkpoints' step values, not only on
    their order: per-step and power EMA, post-hoc EMA, TF's num_updates."""
    return spec.mode in ("ema-per-step", "power-ema", "posthoc-ema") or bool(spec.num_updates)


def diagnostics(spec: Spec, steps, weights) -> list[str]:
    """Warnings ``plan`` shows about a schedule over these checkpoint steps."""
    out: list[str] = []
    steps = np.asarray(steps, dtype=np.int64)
    mode = spec.mode
    if mode == "ema-per-step" and len(steps) > 1:
        d = spec.decay if spec.decay is not None else half_life_to_decay(spec.half_life)
        h = decay_to_half_life(d)
        gap = int(np.diff(steps).max())
        if gap > h:
            out.append(f"largest checkpoint gap ({gap} steps) exceeds the EMA half-life ({h:.4g} steps): "
                       "the per-step EMA is mostly interpolation between checkpoints")
    if mode == "power-ema" and len(steps):
        g = spec.gamma if spec.gamma is not None else sigma_rel_to_gamma(spec.sigma_rel)
        T = int(steps[-1])
        before = (max(int(steps[0]) - 1, 0) / T) ** (g + 1) if T > 0 else 0.0
        if before > 0.01:
            out.append(f"{before:.1%} of the power EMA's weight falls on steps before the first selected "
                       f"checkpoint (step {int(steps[0])}); it is given to that checkpoint")
    if mode == "posthoc-ema":
        g = spec.gamma if spec.gamma is not None else sigma_rel_to_gamma(spec.sigma_rel)
        gs = np.asarray(spec.posthoc_gammas, dtype=np.float64)
        if g > gs.max() or g < gs.min():
            s_rel = gamma_to_sigma_rel(g)
            known = sorted(gamma_to_sigma_rel(x) for x in set(gs.tolist()))
            out.append(f"target sigma_rel {s_rel:.4g} lies outside the stored widths "
                       f"({', '.join(f'{k:.4g}' for k in known)}): extrapolation amplifies noise")
    if mode in ("ema", "weighted-ema") and len(steps) > 1:
        w = np.asarray(weights, dtype=np.float64)
        top = int(np.argmax(np.abs(w)))
        share = float(np.abs(w[top]) / np.abs(w).sum())
        if share > 0.5:
            where = "first" if top == 0 else ("last" if top == len(w) - 1 else f"#{top + 1}")
            out.append(f"the {where} checkpoint (step {int(steps[top])}) carries {share:.0%} of the weight: "
                       f"--decay {spec.decay:g} is applied once per checkpoint; for a per-step EMA use "
                       "--decay-per step or --half-life STEPS")
    s_abs = float(np.abs(weights).sum())
    if s_abs > 1 + 1e-9:
        out.append(f"sum of |weights| is {s_abs:.4g} (> 1: negative weights amplify noise)")
    return out
