"""``--watch DIR`` (``ema_cli.watch``): a running average, updated as checkpoints appear.

A sidecar next to training: every ``poll`` seconds the directory is scanned
(as an input directory is: its checkpoints, or its checkpoint sub-directories).
A checkpoint is taken once it is complete: it opens cleanly (TF and sharded
checkpoints are only visible once their ``.index`` / index file exists), its
files have not changed since the previous scan, and an HF Trainer
``checkpoint-N/`` holds its ``trainer_state.json`` (the Trainer writes it last).

Each new checkpoint updates the running float64 state with O(1) reads (only
the new checkpoint is read; the previous one is kept in memory for the per-step
EMA's linear interpolation):

- the uniform mean keeps the float64 sum ``S`` in checkpoint order and writes
  ``round(S / n)``: the same bits as the batch ``average`` (the kernel's mean is
  that sum, then one division);
- any EMA (``decay``, ``num_updates``, ``--decay-per step``, ``half_life``) is a
  linear recurrence ``e_n = a e_{n-1} + b x_{n-1} + c x_n`` whose coefficients
  are read off the schedule's own weight vectors for n-1 and n checkpoints (and
  checked against them), so the result equals the batch weighted sum within
  float64 rounding.

After each update the output is written atomically (the engine's staging and
rename): killed at any moment, the output is the previous complete average.
Non-averaged tensors come from the newest checkpoint, as in ``average``.  The
output records the recipe (every checkpoint so far with its batch weight).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ema_cli import dtypes, engine, formats, interrupts, notices
from ema_cli.errors import EmaError, UsageError

_SUPPORTED = ("mean", "swa", "ema", "ema-per-step")


@dataclass
class WatchPlan(engine.Plan):
    """A plan over the newest checkpoint whose averaged tensors are overrides
    (the running average, rounded); it records the watch's recipe."""

    recipe: dict | None = None
    averaged: frozenset = frozenset()  # the tensors holding running averages (render counts them)

    def describe(self) -> dict | None:
        return self.recipe


def _signature(src) -> tuple:
    sig = []
    for f in (src.path, *src.files):
        try:
            st = os.stat(f)
        except OSError:
            return ()
        sig.append((f, st.st_size, st.st_mtime_ns))
    return tuple(sorted(set(sig)))


def _hf_incomplete(src) -> bool:
    """An HF Trainer checkpoint-N/ directory without its trainer_state.json (written last)."""
    d = os.path.dirname(os.path.abspath(src.path))
    return os.path.basename(d).startswith("checkpoint-") and not os.path.exists(os.path.join(d, "trainer_state.json"))


class Watcher:
    """The running average over the checkpoints appearing in ``directory``."""

    def __init__(self, directory: str, output: str, opts: engine.Options, *, fmt: str | None = None,
                 until_step: int | None = None, poll: float = 2.0,
                 on_update: Callable[[engine.Result], None] | None = None):
        mode = opts.spec.mode
        if mode not in _SUPPORTED or opts.spec.zero_debias or opts.spec.tf_exact or opts.spec.weights is not None:
            raise UsageError(f"--watch updates the uniform mean or an EMA (--decay, --num-updates, --decay-per step, "
                             f"--half-life) incrementally; not {mode}"
                             + (" with --zero-debias" if opts.spec.zero_debias else "")
                             + (" with --tf-exact" if opts.spec.tf_exact else ""))
        if any(v is not None for v in (opts.last_n, opts.start_step, opts.every, opts.top_k, opts.metrics)):
            raise UsageError("--watch averages every checkpoint that appears: no windows or --top-k")
        if opts.names != "original":
            raise UsageError("--watch writes the averages under the original names (no --names shadow)")
        if opts.order != "step":
            raise UsageError("--watch orders checkpoints by step (no --order given)")
        if poll <= 0:
            raise UsageError("--poll must be positive")
        self.directory, self.output, self.opts, self.fmt = directory, output, opts, fmt
        self.until_step, self.poll, self.on_update = until_step, poll, on_update
        self.mean = mode in ("mean", "swa")
        self.steps: list[int] = []
        self.paths: list[str] = []
        self.state: dict[str, np.ndarray] = {}  # float64: the sum (mean) or the EMA
        self.prev: dict[str, np.ndarray] = {}  # the previous checkpoint's averaged tensors
        self.template: engine.Plan | None = None
        self.weights: np.ndarray | None = None
        self._pending: dict[str, tuple] = {}
        self.result: engine.Result | None = None
        self.stop_event = threading.Event()
        self.taken: list[str] = []  # the checkpoints averaged so far, in step order
        self._warned: set[str] = set()
        self.keep_prev = mode == "ema-per-step"  # its recurrence interpolates from the previous checkpoint

    # ----------------------------------------------------------------- discovery

    def _excluded(self, src) -> bool:
        out = os.path.realpath(self.output)
        for f in (src.path, *src.files):
            real = os.path.realpath(f)
            if real == out or real.startswith(out.rstrip(os.sep) + os.sep) or real.startswith(out + "."):
                return True  # the output (a file, a TF prefix's files, a directory)
        return False

    def _names_output(self, note: str) -> bool:
        """Whether a scan's note is about the output (a whole path in it, not a prefix of another name)."""
        import re

        for p in {self.output.rstrip("/" + os.sep), os.path.realpath(self.output)}:
            if p and re.search(re.escape(p) + r"(?=[/\s,;()]|$)", note):
                return True
        return False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            notices.warn(message)

    def new_checkpoints(self) -> list[tuple[int, formats.Source]]:
        """Complete checkpoints not taken yet, by step."""
        failed = None
        with notices.capture() as notes:  # a scan's notes (left-out directories): said once, not every poll
            try:
                sources = formats.resolve_inputs([self.directory], engine.reader_options(self.opts))
            except EmaError as e:
                failed = e
        for note in notes + ([] if failed is not None else list(sources.warnings)):
            if not self._names_output(note):  # (the output inside the directory is meant)
                self._warn_once(note, note)
        if failed is not None:  # nothing there yet, or a layout to fix (said once; waiting)
            if "no checkpoints" not in str(failed) and "no such file" not in str(failed):
                self._warn_once(str(failed), f"{failed} (--watch keeps waiting)")
            return []
        ready = []
        for src in sources:
            if src.path in self.paths or self._excluded(src) or _hf_incomplete(src):
                continue
            sig = _signature(src)
            if not sig or self._pending.get(src.path) != sig:
                self._pending[src.path] = sig  # seen once: taken when unchanged at the next scan
                continue
            try:
                r = formats.open_reader(src)
            except EmaError as e:  # not complete yet (or corrupt: said once, retried)
                self._warn_once(src.path + repr(sig), f"{e} (--watch retries it)")
                continue
            try:
                if "ema_avg" in r.metadata():
                    continue  # another ema-avg output in the directory
                step = r.step()
            finally:
                r.close()
            if step is None:
                step = engine.step_from_name(src.name_hint or src.path)
            if step is None:
                notices.warn(f"{src.path}: no step in the checkpoint or its name; --watch skips it")
                self.paths.append(src.path)
                continue
            ready.append((step, src))
        ready.sort(key=lambda t: t[0])
        return ready

    # ----------------------------------------------------------------- the update

    def _coefficients(self, steps: list[int]) -> tuple[float, float, float, np.ndarray]:
        """(a, b, c): e_n = a e_{n-1} + b x_{n-1} + c x_n, from the batch weights."""
        spec = dataclasses.replace(self.opts.spec)
        w_new = spec.weights_for(np.array(steps, np.int64))
        n = len(steps)
        if n == 1:
            return 0.0, 0.0, 1.0, w_new
        w_old = self.weights
        if n == 2:
            return float(w_new[0]), 0.0, float(w_new[1]), w_new
        head_old, head_new = w_old[: n - 2], w_new[: n - 2]
        k = int(np.flatnonzero(head_old)[0]) if np.any(head_old) else -1
        a = float(head_new[k] / head_old[k]) if k >= 0 else 0.0
        scale = float(np.abs(w_new).max()) or 1.0
        if np.max(np.abs(head_new - a * head_old)) > 1e-12 * scale:
            raise EmaError("internal: this schedule is not a recurrence over checkpoints; --watch cannot update it")
        b = float(w_new[n - 2] - a * w_old[n - 2])
        if abs(b) <= 1e-13 * scale:
            b = 0.0  # (the per-checkpoint EMA: zero up to the weights' rounding)
        if b != 0.0 and not self.keep_prev:
            raise EmaError("internal: this schedule needs the previous checkpoint; --watch cannot update it")
        return a, b, float(w_new[n - 1]), w_new

    def add(self, step: int, src: formats.Source) -> engine.Result:
        """Fold one new checkpoint in and write the output.  A signal that
        arrives from the commit on acts once the update is recorded and
        reported (``interrupts.until_done``); one before it discards the update."""
        with interrupts.until_done():
            return self._add(step, src)

    def _add(self, step: int, src: formats.Source) -> engine.Result:
        if self.steps and step <= self.steps[-1]:
            notices.warn(f"{src.path}: step {step} is not after the latest averaged ({self.steps[-1]}); "
                         "--watch only adds newer checkpoints: skipped")
            self.paths.append(src.path)
            return self.result
        pool = engine.ReaderPool()
        try:
            opts = dataclasses.replace(self.opts, spec=dataclasses.replace(self.opts.spec), allow_copy_only=True)
            plan = engine.make_plan([src.path], opts, out_format=self._out_format(src.path), pool=pool)
            if self.template is not None:
                want = {t.name: (t.info.dtype, t.info.shape, t.action) for t in self.template.tasks}
                got = {t.name: (t.info.dtype, t.info.shape, t.action) for t in plan.tasks}
                if want != got:
                    diff = sorted(set(want.items()) ^ set(got.items()))
                    raise EmaError(f"does not match the checkpoints averaged so far (tensor {diff[0][0]!r})",
                                   path=src.path)
            steps = self.steps + [step]
            a, b, c, w = self._coefficients(steps)
            averaged = [t for t in plan.tasks if t.action == "average"]
            reader = pool.get(plan.checkpoints[0].source)
            new_state, new_prev, overrides = {}, {}, {}
            for t in averaged:
                x = np.asarray(reader.read(t.name))
                if t.info.dtype == "bfloat16":  # ml_dtypes bf16 or its raw uint16 bits: widen exactly
                    x64 = (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
                else:
                    x64 = x.astype(np.float64)
                if not self.opts.allow_nonfinite and not np.all(np.isfinite(x64)):
                    raise EmaError("non-finite values (NaN or Inf); --allow-nonfinite averages them",
                                   path=src.path, tensor=t.name)
                if self.mean:
                    s = x64 if not self.state else self.state[t.name] + x64
                    value = s / len(steps)
                elif not self.state:
                    s = value = x64
                else:
                    s = a * self.state[t.name]
                    if b != 0.0:
                        s = s + b * self.prev[t.name]
                    s = s + c * x64
                    value = s
                new_state[t.name] = s
                if self.keep_prev:
                    new_prev[t.name] = x64
                overrides[t.name] = dtypes.cast_rounded(value, t.out_dtype, storage=True)  # (bf16: raw bits)
            wplan = self._write_plan(plan, overrides, steps, w, src)
            result = engine.run(wplan, self.output, self._out_format(src.path), force=True, pool=pool)
        finally:
            pool.close()
        self.state, self.prev = new_state, new_prev
        self.steps, self.weights = steps, w
        self.paths.append(src.path)
        self.taken.append(src.path)
        self.template = self.template or plan
        self.result = result
        if self.on_update is not None:
            self.on_update(result)
        return result

    def _out_format(self, newest: str) -> str | None:
        in_formats = ()
        if self.fmt is None and self.output.endswith(".ckpt"):
            in_formats = {s.format for s in formats.resolve_inputs([newest], engine.reader_options(self.opts))}
        return formats.output_format(self.output, self.fmt, in_formats)

    def _write_plan(self, plan: engine.Plan, overrides: dict, steps: list[int], w: np.ndarray, src) -> WatchPlan:
        tasks = [engine.Task(t.name, t.out_name, t.info, t.out_dtype, "copy") for t in plan.tasks]
        recipe = plan.describe()
        prior = [{"path": os.path.abspath(p), "step": s, "step_from": "watch", "weight": float(wk), "selected": True, "metric": None}
                 for p, s, wk in zip(self.taken + [src.path], steps, w)]
        recipe.update({"checkpoints": prior, "newest": os.path.abspath(src.path), "sum_abs_weights": float(np.abs(w).sum()),
                       "watch": {"directory": os.path.abspath(self.directory), "checkpoints": len(steps)}})
        fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(engine.Plan)}
        fields.update(tasks=tasks, overrides=overrides, recipe=recipe, averaged=frozenset(overrides))
        return WatchPlan(**fields)

    # ----------------------------------------------------------------- the loop

    def run(self) -> engine.Result | None:
        """Poll until ``until_step`` is reached or :meth:`stop` is called (SIGTERM
        ends the CLI's loop by its exception, between two atomic writes or
        during one, which then leaves the previous output)."""
        while not self.stop_event.is_set():
            interrupts.check()  # a signal Python swallowed (see interrupts.lost): the watch stops
            for step, src in self.new_checkpoints():
                self.add(step, src)
                if self.until_step is not None and self.steps and self.steps[-1] >= self.until_step:
                    return self.result
            self.stop_event.wait(self.poll)
        return self.result

    def stop(self) -> None:
        self.stop_event.set()
