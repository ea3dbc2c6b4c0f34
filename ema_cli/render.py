"""Everything shown to a person (stderr, rich) and the JSON documents (stdout)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import numpy as np

from ema_cli import dtypes, notices

# rich is imported when something is shown (importing its console, progress
# and table modules costs about 0.1 s, a third of a small average's budget):
# with --quiet, or stderr not a terminal, an average never imports it.
_RICH_TERMINAL_ENV = ("FORCE_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE", "JUPYTER_COLUMNS", "JUPYTER_LINES")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


class UI:
    """Progress and summaries on stderr: shown only on a terminal, never with --quiet.
    Tables asked for explicitly (plan, inspect) are printed whenever not --quiet."""

    def __init__(self, quiet: bool, force_terminal: bool | None = None):
        self._force_terminal = force_terminal
        self._console = None
        self.quiet = quiet
        self.live = not quiet and self.is_terminal
        notices.set_quiet(quiet)

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, force_terminal=self._force_terminal, highlight=False, soft_wrap=True)
            if not self._console.is_terminal:  # a file or a pipe: tables as wide as their content, names never folded
                self._console.width = 4096
        return self._console

    @property
    def is_terminal(self) -> bool:
        """rich's answer, without importing rich when stderr is plainly not a terminal."""
        if self._console is None and self._force_terminal is None and not any(k in os.environ for k in _RICH_TERMINAL_ENV):
            try:
                if not sys.stderr.isatty():
                    return False
            except (AttributeError, ValueError, OSError):
                pass
        return self.console.is_terminal

    def warnings(self, msgs: list[str]) -> None:
        for m in msgs:  # worth a line even when stderr is not a terminal
            notices.warn(m)

    @contextlib.contextmanager
    def progress(self, plan):
        if not self.live:
            yield None
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        total_bytes = sum(dtypes.itemsize(t.out_dtype) * t.info.numel for t in plan.tasks)
        cols = (TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.fields[done]}/{task.fields[of]} tensors"), DownloadColumn(), TimeRemainingColumn())
        lock = threading.Lock()
        with Progress(*cols, console=self.console, transient=True) as prog:
            tid = prog.add_task("averaging", total=total_bytes, done=0, of=len(plan.tasks))
            count = [0]

            def on_tensor(task):
                with lock:
                    count[0] += 1
                    prog.update(tid, advance=dtypes.itemsize(task.out_dtype) * task.info.numel, done=count[0])

            yield on_tensor

    def summary(self, result) -> None:
        if not self.live:
            return
        p = result.plan
        n_avg = sum(t.action == "average" for t in p.tasks)
        desc = p.options.spec.describe()
        self.console.print(
            f"[bold green]wrote[/] {result.output} ({result.format}, {human_bytes(result.bytes_written)}): "
            f"{desc['mode']} of {len(p.selected)} checkpoint(s), {n_avg} tensor(s) averaged, "
            f"{len(p.tasks) - n_avg} copied from {p.checkpoints[p.newest].path}"
            + (f", {len(p.skipped)} left out" if p.skipped else "")
            + f" in {result.timings.get('total_s', 0):.2f} s"
        )

    def plan_table(self, plan, doc) -> None:
        from rich.table import Table

        params = {k: v for k, v in doc["params"].items() if k not in ("selection", "dtype")}
        t = Table(title=f"{doc['mode']}  " + "  ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in params.items()))
        sel = doc["params"].get("selection", {})
        from rich.markup import escape

        metric = escape(sel["metric"]) if "metrics" in sel and sel.get("metric") else None
        cols = ("#", "checkpoint", "step") + ((metric,) if metric else ()) + ("weight", "")
        for col in cols:
            t.add_column(col, justify="left" if col in ("checkpoint", "") else "right",
                         overflow="fold", no_wrap=col != "checkpoint")
        wmax = max((abs(c["weight"]) for c in doc["checkpoints"]), default=1.0) or 1.0
        for i, c in enumerate(doc["checkpoints"]):
            bar = "█" * int(round(24 * abs(c["weight"]) / wmax)) if c["selected"] else "[dim]not selected[/]"
            mcol = (("-" if c.get("metric") is None else f"{c['metric']:.6g}"),) if metric else ()
            t.add_row(str(i), c["path"], "" if c["step"] is None else str(c["step"]), *mcol,
                      f"{c['weight']:.6f}" if c["selected"] else "-", bar)
        self.console.print(t)
        if sel.get("top_k") is not None:
            self.console.print(f"top {sel['top_k']} by {metric} ({sel.get('direction')}) from {escape(sel['metrics'])}")
        extra = f"sum |w| = {doc['sum_abs_weights']:.6f}"
        for key in ("half_life_steps", "half_life_checkpoints", "sigma_rel"):
            if key in doc["params"]:
                extra += f"   {key} = {doc['params'][key]:.6g}"
        self.console.print(extra)

    def inspect_tables(self, docs) -> None:
        from rich.table import Table

        for doc in docs:
            t = Table(title=f"{doc['path']}  ({doc['format']}, step {doc['step']})")
            for col in ("tensor", "dtype", "shape", "size", "role", "kind", "why"):
                t.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
            for r in doc["tensors"]:
                t.add_row(r["name"], r["dtype"], str(r["shape"]), human_bytes(r["nbytes"]), r["role"],
                          r.get("kind", ""), r.get("why", ""))
            self.console.print(t)
            tot = doc["totals"]
            self.console.print(
                f"{tot['tensors']} tensors, {human_bytes(tot['bytes'])}; "
                + ", ".join(f"{k}: {v}" for k, v in tot["roles"].items())
            )


def plan_json(plan) -> dict:
    d = plan.describe()
    mode = d.pop("mode")
    cks = d.pop("checkpoints")
    tool = d.pop("tool")
    sum_abs = d.pop("sum_abs_weights")
    newest = d.pop("newest")
    return {"tool": tool, "mode": mode, "params": d, "checkpoints": cks, "sum_abs_weights": sum_abs,
            "newest": newest, "warnings": list(plan.warnings)}


def result_json(result) -> dict:
    p = result.plan
    doc = plan_json(p)
    doc.update({
        "output": result.output,
        "format": result.format,
        "files": result.files,
        "tensors": {
            "averaged": sum(t.action == "average" for t in p.tasks),
            "copied": sum(t.action == "copy" for t in p.tasks),
            "skipped": list(p.skipped),
        },
        "bytes_written": result.bytes_written,
        "timings": {k: round(v, 6) for k, v in result.timings.items()},
        "executor": result.executor,
        "tasks": result.tasks,
    })
    from ema_cli.formats import remote

    if remote.copied:  # remote inputs of formats read from local files
        doc["copied"] = list(remote.copied)
    return doc


def weights_summary(w: np.ndarray) -> str:
    return ", ".join(f"{x:.4g}" for x in w)
