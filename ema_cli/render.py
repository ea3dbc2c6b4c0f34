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


def _is_averaged(plan, task) -> bool:
    """Averaged in this output (a --watch plan writes its running averages as overrides)."""
    return task.action == "average" or task.name in getattr(plan, "averaged", ())


def human_bytes(n: float) -> str:
    """SI units (powers of 1000, like ``--max-shard-size 40kB``): B, kB, MB, GB, TB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _plain_table(title: str | None, cols: list[str], rows: list[list[str]], right: set[str]) -> str:
    """A table for pipes and files: a header line and one line per row, columns
    aligned with two spaces (``ema-avg inspect X | grep kernel`` finds the row)."""
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]

    def line(cells):
        out = [cell.rjust(w) if col in right else cell.ljust(w) for col, cell, w in zip(cols, cells, widths)]
        return "  ".join(out).rstrip()

    text = ([title.rstrip()] if title else []) + [line(cols)] + [line(r) for r in rows]
    return "\n".join(text) + "\n"


def _stdout_is_terminal() -> bool:
    if any(k in os.environ for k in _RICH_TERMINAL_ENV):
        from rich.console import Console

        return Console(file=sys.stdout).is_terminal
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class UI:
    """Progress and summaries on stderr: shown only on a terminal, never with --quiet.
    The primary output of plan and inspect (their tables) goes to stdout: rich
    tables on a terminal, plain aligned text otherwise (``--quiet`` does not
    silence it)."""

    def __init__(self, quiet: bool, force_terminal: bool | None = None):
        self._force_terminal = force_terminal
        self._console = None
        self._out_console = None
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
    def out_console(self):
        """A rich console on stdout, or None when stdout is not a terminal (plain text then)."""
        if self._out_console is None:
            if not _stdout_is_terminal():
                return None
            from rich.console import Console

            self._out_console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        return self._out_console

    def table(self, title: str | None, cols: list[str], rows: list[list[str]], *, right: set[str] = frozenset(),
              fold: set[str] = frozenset(), footer: list[str] = ()) -> None:
        """Print a table on stdout (rich on a terminal, plain text otherwise), then footer lines."""
        con = self.out_console
        if con is None:
            sys.stdout.write(_plain_table(title, cols, rows, set(right)) + "".join(f + "\n" for f in footer))
            sys.stdout.flush()
            return
        from rich.markup import escape
        from rich.table import Table

        t = Table(title=escape(title) if title else None)
        for col in cols:
            t.add_column(escape(col), justify="right" if col in right else "left", overflow="fold",
                         no_wrap=col not in fold)
        for r in rows:
            t.add_row(*(escape(c) for c in r))
        con.print(t)
        for f in footer:
            con.print(f, markup=False)

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
        n_avg = sum(_is_averaged(p, t) for t in p.tasks)
        desc = p.options.spec.describe()
        self.console.print(
            f"[bold green]wrote[/] {result.output} ({result.format}, {human_bytes(result.bytes_written)}): "
            f"{desc['mode']} of {len(p.selected)} checkpoint(s), {n_avg} tensor(s) averaged, "
            f"{len(p.tasks) - n_avg} copied from {p.checkpoints[p.newest].path}"
            + (f", {len(p.skipped)} left out" if p.skipped else "")
            + (", verified" if "verify_s" in result.timings else "")
            + f" in {result.timings.get('total_s', 0):.2f} s",
            markup=True, highlight=False,
        )

    def plan_table(self, plan, doc) -> None:
        params = {k: v for k, v in doc["params"].items() if k not in ("selection", "dtype")}
        title = f"{doc['mode']}  " + "  ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in params.items())
        sel = doc["params"].get("selection", {})
        metric = sel["metric"] if "metrics" in sel and sel.get("metric") else None
        plain = self.out_console is None
        cols = ["#", "checkpoint", "step"] + ([metric] if metric else []) + ["weight", "selected" if plain else ""]
        wmax = max((abs(c["weight"]) for c in doc["checkpoints"]), default=1.0) or 1.0
        rows = []
        for i, c in enumerate(doc["checkpoints"]):
            if plain:
                last = "yes" if c["selected"] else "no"
            else:
                last = "█" * int(round(24 * abs(c["weight"]) / wmax)) if c["selected"] else "not selected"
            mcol = (["-" if c.get("metric") is None else f"{c['metric']:.6g}"]) if metric else []
            rows.append([str(i), c["path"], "" if c["step"] is None else str(c["step"]), *mcol,
                         f"{c['weight']:.6f}" if c["selected"] else "-", last])
        footer = []
        if sel.get("top_k") is not None:
            footer.append(f"top {sel['top_k']} by {metric} ({sel.get('direction')}) from {sel['metrics']}")
        extra = f"sum |w| = {doc['sum_abs_weights']:.6f}"
        for key in ("half_life_steps", "half_life_checkpoints", "sigma_rel"):
            if key in doc["params"]:
                extra += f"   {key} = {doc['params'][key]:.6g}"
        footer.append(extra)
        right = {"#", "step", "weight"} | ({metric} if metric else set())
        self.table(title, cols, rows, right=right, fold={"checkpoint"}, footer=footer)

    def inspect_tables(self, docs) -> None:
        cols = ["tensor", "dtype", "shape", "size", "role", "kind", "why"]
        for doc in docs:
            rows = [[r["name"], r["dtype"], str(r["shape"]), human_bytes(r["nbytes"]), r["role"],
                     r.get("kind", ""), r.get("why", "")] for r in doc["tensors"]]
            tot = doc["totals"]
            footer = [f"{tot['tensors']} tensors, {human_bytes(tot['bytes'])}; "
                      + ", ".join(f"{k}: {v}" for k, v in tot["roles"].items())]
            self.table(f"{doc['path']}  ({doc['format']}, step {doc['step']})", cols, rows,
                       right={"size"}, fold=set(cols), footer=footer)


def _abs(path):
    from ema_cli import storage

    return storage.absolute(path) if isinstance(path, str) and path and not path.startswith("<") else path


def plan_json(plan) -> dict:
    d = dict(plan.describe())  # popped below: never the plan's own dict (a watch plan keeps its recipe)
    mode = d.pop("mode")
    cks = d.pop("checkpoints")
    tool = d.pop("tool")
    sum_abs = d.pop("sum_abs_weights")
    newest = d.pop("newest")
    # paths in JSON are absolute, all of them (inputs, newest, output, files, metrics)
    cks = [{**c, "path": _abs(c["path"])} for c in cks]
    if "metrics" in d.get("selection", {}):
        d["selection"] = {**d["selection"], "metrics": _abs(d["selection"]["metrics"])}
    return {"tool": tool, "mode": mode, "params": d, "checkpoints": cks, "sum_abs_weights": sum_abs,
            "newest": _abs(newest), "warnings": list(plan.warnings)}


def output_dtypes(plan) -> dict:
    """``{"averaged": dtype or None, "tensors": {dtype: count}}``: what the output holds."""
    from collections import Counter

    avg = sorted({t.out_dtype for t in plan.tasks if _is_averaged(plan, t)})
    return {"averaged": avg[0] if len(avg) == 1 else (avg or None),
            "tensors": dict(Counter(t.out_dtype for t in plan.tasks))}


def result_json(result) -> dict:
    p = result.plan
    doc = plan_json(p)
    dts = output_dtypes(p)
    doc.update({
        "output": _abs(result.output),
        "format": result.format,
        "files": [_abs(f) for f in result.files],
        "dtype": dts["averaged"],
        "dtypes": dts["tensors"],
        "verified": "verify_s" in result.timings,
        "tensors": {
            "averaged": sum(_is_averaged(p, t) for t in p.tasks),
            "copied": sum(not _is_averaged(p, t) for t in p.tasks),
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
