"""The command line: parse, call the library, render.  Nothing else lives here."""

# (no ``from __future__ import annotations`` in the command modules: typer would
# eval every option's annotation string on every run, 14 ms of start-up)

import difflib
import errno
import glob
import json
import os
import sys
import time
from typing import Annotated, List, Optional

import typer

from ema_cli import __version__, _entry, _typer_plain, api, engine, interrupts, render, storage
from ema_cli.cli_options import Force, Json, StorageOption, Suffix
from ema_cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, EmaError, UsageError

_typer_plain.install()  # str/int/float options without pydantic (start-up time)

app = typer.Typer(
    name="ema-avg",
    help="Average a sequence of training checkpoints (EMA, SWA, weighted, per-step and post-hoc EMA).\n\n"
    "`ema-avg ckpts/* -o avg.safetensors` runs `average`, the default command.",
    add_completion=True,  # --install-completion / --show-completion (README: Shell completion)
    no_args_is_help=False,  # a bare `ema-avg` prints the usage and exits 2 (main)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _readable_argument_help() -> None:
    """Arguments with a metavar show it as given: ``INPUT...`` in the usage line and
    the help, not typer's ``{inputs}...`` and ``<list[str]>``."""
    arg_cls = typer.core.TyperArgument
    usage, type_rich = arg_cls._usage_display_name, arg_cls.display_type_rich

    def _usage_display_name(self):
        return self.metavar if self.metavar else usage(self)

    def display_type_rich(self, ctx):
        return None if self.metavar else type_rich(self, ctx)

    arg_cls._usage_display_name = _usage_display_name
    arg_cls.display_type_rich = display_type_rich


_readable_argument_help()

# ------------------------------------------------------------------ shared options
Inputs = Annotated[List[str], typer.Argument(metavar="INPUT...", help="Checkpoints: files, globs, directories, TF prefixes, sharded indexes (~ and $VAR are expanded in quoted globs).", show_default=False)]
Swa = Annotated[bool, typer.Option("--swa", help="Uniform mean (SWA, decay = n/(1+n)). The default.")]
Decay = Annotated[Optional[float], typer.Option("--decay", metavar="D", help="EMA decay D: TensorFlow's ExponentialMovingAverage over the checkpoints in order.")]
NumUpdates = Annotated[bool, typer.Option("--num-updates", help="TF num_updates: decay at checkpoint k is min(D, (1+n_k)/(10+n_k)), n_k its step.")]
ZeroDebias = Annotated[bool, typer.Option("--zero-debias", help="TF zero-debiased EMA: start at zero, divide by 1 - prod(decays).")]
Weights = Annotated[Optional[str], typer.Option("--weights", metavar="W1,W2,...", help="w1,w2,...: weighted average (with --decay: TF weighted_moving_average).")]
DecayPer = Annotated[str, typer.Option("--decay-per", metavar="checkpoint|step", help="checkpoint (TF semantics) or step (per-step EMA from the checkpoints' steps).")]
Interp = Annotated[str, typer.Option("--interp", metavar="linear|hold", help="Per-step schedules: trajectory between checkpoints is 'linear' or 'hold'.")]
HalfLife = Annotated[Optional[float], typer.Option("--half-life", metavar="H", help="Per-step EMA with half-life H steps (D = 2**(-1/H)).")]
SigmaRel = Annotated[Optional[float], typer.Option("--sigma-rel", metavar="S", help="EDM2 power-function EMA of relative width S (< 0.2887) at the last step.")]
Gamma = Annotated[Optional[float], typer.Option("--gamma", metavar="G", help="EDM2 power-function EMA with exponent G at the last step.")]
TfExact = Annotated[bool, typer.Option("--tf-exact", help="Replay TensorFlow's float32 recurrence bit for bit (with --decay).")]
LastN = Annotated[Optional[int], typer.Option("--last-n", metavar="N", help="Keep only the last N checkpoints.")]
StartStep = Annotated[Optional[int], typer.Option("--start-step", metavar="STEP", help="Keep checkpoints with step >= S.")]
Every = Annotated[Optional[int], typer.Option("--every", metavar="K", help="Keep every K-th checkpoint (starting with the first kept).")]
Metrics = Annotated[Optional[str], typer.Option("--metrics", metavar="FILE", help="Metrics by step or checkpoint (with --top-k): trainer_state.json or its directory, TensorBoard event file or directory, Keras CSVLogger CSV, CSV or JSON.")]
Metric = Annotated[Optional[str], typer.Option("--metric", metavar="NAME", help="The column, key or tag in --metrics (e.g. eval_loss); needed when it holds several.")]
TopK = Annotated[Optional[int], typer.Option("--top-k", metavar="K", help="Average the K best checkpoints by --metrics.")]
Maximize = Annotated[bool, typer.Option("--maximize", help="Higher metric is better.")]
Minimize = Annotated[bool, typer.Option("--minimize", help="Lower metric is better.")]
Order = Annotated[str, typer.Option("--order", metavar="step|given", help="'step' (by training step) or 'given' (command-line order).")]
Include = Annotated[Optional[List[str]], typer.Option("--include", metavar="REGEX", help="Also average tensors matching REGEX (repeatable).")]
Exclude = Annotated[Optional[List[str]], typer.Option("--exclude", metavar="REGEX", help="Copy, do not average, tensors matching REGEX (repeatable).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
# output options shared by average and posthoc
Output = Annotated[str, typer.Option("--output", "-o", metavar="OUT", help="Output path (format from its suffix).", show_default=False)]
Format = Annotated[Optional[str], typer.Option("--format", metavar="FORMAT", help="Output format: safetensors, tf, hdf5, keras or torch.")]
Dtype = Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="keep, float32, float16, bfloat16 or float64 (or bf16, fp16, half, fp32, float, fp64): dtype of averaged tensors.")]
AllowNonfinite = Annotated[bool, typer.Option("--allow-nonfinite", help="Average NaN/Inf values instead of failing.")]
Verify = Annotated[bool, typer.Option("--verify", help="Reopen the output and check every tensor against what was computed.")]
Threads = Annotated[int, typer.Option("--threads", metavar="N", help="Worker threads (0: one per core, at most 4).")]
StateKey = Annotated[Optional[str], typer.Option("--state-key", metavar="KEY[.KEY...]", help="PyTorch: the key holding the state dict (e.g. state_dict_ema); default: state_dict, model, module, model_state_dict or the top level.")]
SkipMissing = Annotated[bool, typer.Option("--skip-missing", help="Checkpoints a TF 'checkpoint' state file names that are gone: a warning each instead of an error.")]
AllowCopyOnly = Annotated[bool, typer.Option("--allow-copy-only", help="Accept a plan that averages no tensor (every tensor copied from the newest).")]
Dask = Annotated[Optional[str], typer.Option("--dask", metavar="ADDRESS", help="Run the shard tasks on a Dask cluster: a scheduler address (tcp://host:8786) or local:N (a LocalCluster of N worker processes). The output must be sharded: --max-shard-size, or a directory (one shard per worker).")]
Saturate = Annotated[bool, typer.Option("--saturate", help="Write averages beyond the output dtype's range as its largest finite value (default: an error).")]


def _spec(swa, decay, num_updates, zero_debias, weights, decay_per, interp, half_life, sigma_rel, gamma, tf_exact):
    return api._spec(swa=swa, decay=decay, num_updates=num_updates, zero_debias=zero_debias, weights=weights,
                     decay_per=decay_per, interp=interp, half_life=half_life, sigma_rel=sigma_rel,
                     gamma=gamma, tf_exact=tf_exact)


def _paths(paths) -> list[str]:
    """~ and $VAR expanded in the paths ema-avg interprets itself (quoted globs, --output=~/x)."""
    return [api.expand_path(p) for p in paths or []]


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.")] = False,
):
    """(--version is answered by main before the command line is parsed; listed here for --help.)"""
    if version:
        print(f"ema-avg {__version__}")
        raise typer.Exit(0)


def _maximize(maximize: bool, minimize: bool) -> bool | None:
    if maximize and minimize:
        raise UsageError("--maximize and --minimize exclude each other")
    return True if maximize else (False if minimize else None)


def _emit_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ average


@app.command(help="Average checkpoints into one (the default command).")
def average(
    inputs: Inputs,
    output: Output,
    fmt: Format = None,
    dtype: Dtype = "keep",
    swa: Swa = False, decay: Decay = None, num_updates: NumUpdates = False, zero_debias: ZeroDebias = False,
    weights: Weights = None, decay_per: DecayPer = "checkpoint", interp: Interp = "linear",
    half_life: HalfLife = None, sigma_rel: SigmaRel = None, gamma: Gamma = None, tf_exact: TfExact = False,
    last_n: LastN = None, start_step: StartStep = None, every: Every = None,
    metrics: Metrics = None, metric: Metric = None, top_k: TopK = None, maximize: Maximize = False, minimize: Minimize = False,
    order: Order = "step", include: Include = None, exclude: Exclude = None,
    names: Annotated[str, typer.Option("--names", metavar="original|shadow", help="'original' (evaluation-ready) or 'shadow' (x/SUFFIX, TF training layout).")] = "original",
    suffix: Suffix = "ExponentialMovingAverage",
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size", metavar="SIZE", help="Write HF-style shards of at most SIZE (e.g. 2GB) into the OUTPUT directory.")] = None,
    allow_nonfinite: AllowNonfinite = False, verify: Verify = False, threads: Threads = 0, force: Force = False,
    allow_copy_only: AllowCopyOnly = False, quiet: Quiet = False, as_json: Json = False,
    saturate: Saturate = False, state_key: StateKey = None, skip_missing: SkipMissing = False,
    dask: Dask = None, storage_option: StorageOption = None,
    watch: Annotated[bool, typer.Option("--watch", help="Sidecar mode, `--watch DIR`: keep OUT the running average of the checkpoints appearing in the one INPUT directory (mean or EMA, updated incrementally, written atomically); stops on SIGTERM or --until-step.")] = False,
    until_step: Annotated[Optional[int], typer.Option("--until-step", metavar="STEP", help="--watch: stop once a checkpoint with this step or later is averaged.")] = None,
    poll: Annotated[float, typer.Option("--poll", metavar="SECONDS", help="--watch: seconds between scans of DIR.")] = 2.0,
):
    t0 = time.perf_counter()
    if not watch and (until_step is not None or poll != 2.0):
        raise UsageError("--until-step and --poll go with --watch DIR")
    if watch and len(inputs) != 1:
        raise UsageError(f"--watch DIR watches one directory (got {len(inputs)} inputs)")
    opts = api._options(
        _spec(swa, decay, num_updates, zero_debias, weights, decay_per, interp, half_life, sigma_rel, gamma, tf_exact),
        select=api.Select(last_n=last_n, start_step=start_step, every=every, metrics=metrics, metric=metric,
                          top_k=top_k, maximize=_maximize(maximize, minimize)),
        order=order, include=include, exclude=exclude, dtype=dtype, allow_nonfinite=allow_nonfinite,
        names=names, suffix=suffix, max_shard_size=max_shard_size or None, threads=threads,
        allow_copy_only=allow_copy_only, saturate=saturate, state_key=state_key, skip_missing=skip_missing,
        storage_options=storage.parse_options(storage_option),
    )
    if watch:
        _watch(api.expand_path(inputs[0]), opts, api.expand_path(output), fmt, until_step=until_step, poll=poll,
               quiet=quiet, as_json=as_json)
        return
    _execute(_paths(inputs), opts, api.expand_path(output), fmt, force=force, quiet=quiet, as_json=as_json,
             verify=verify, t0=t0, dask=dask)


def _watch(directory, opts, output, fmt, *, until_step, poll, quiet, as_json) -> None:
    """--watch: one update per new checkpoint; --json prints one compact JSON document per update
    (JSON lines).  SIGTERM stops it (exit 0): the output is the last complete average."""
    from ema_cli import watching as watch_mod

    ui = render.UI(quiet=quiet)

    def on_update(result) -> None:
        if as_json:
            sys.stdout.write(json.dumps(render.result_json(result), default=str) + "\n")
            sys.stdout.flush()
        if ui.live:
            w = result.plan.recipe["watch"]
            ui.console.print(f"updated {result.output}: {w['checkpoints']} checkpoint(s), newest "
                             f"{result.plan.recipe['newest']}", markup=False)

    opts.allow_copy_only = True
    interrupts.ends_at_commit = False  # each update commits; a signal during one acts right after it
    watcher = watch_mod.Watcher(directory, output, opts, fmt=fmt, until_step=until_step, poll=poll,
                                on_update=on_update)
    try:
        watcher.run()
    except _entry.Terminated:
        pass  # a sidecar's normal end; an update in progress was discarded (its staging removed)


def _execute(inputs, opts, output, fmt, *, force, quiet, as_json, verify, t0, targets=None, dask=None) -> None:
    """Plan, write, optionally verify, then render: shared by average and posthoc.

    ``targets``: ``[(opts, output), ...]`` written in one pass over the inputs
    (post-hoc EMA of several widths) instead of ``opts`` and ``output``."""
    targets = targets or [(opts, output)]
    ui = render.UI(quiet=quiet)
    results = api._run(inputs, targets, fmt, force=force, verify=verify, t0=t0, dask=dask,
                       on_plans=lambda plans: ui.warnings(list(dict.fromkeys(w for p in plans for w in p.warnings))),
                       progress_cm=ui.progress)
    for result in results:
        ui.summary(result)
    if as_json:
        docs = [render.result_json(r) for r in results]
        _emit_json(docs[0] if len(docs) == 1 else {"outputs": docs})


# ------------------------------------------------------------------ posthoc


@app.command(help="EDM2 post-hoc EMA: reconstruct a power-function EMA of any width from snapshot series.")
def posthoc(
    series: Annotated[List[str], typer.Option("--from", metavar="S=DIR_OR_GLOB", help="S=DIR_OR_GLOB: a series of power-EMA snapshots of relative width S (repeat).", show_default=False)],
    output: Output,
    sigma_rel: Annotated[Optional[str], typer.Option("--sigma-rel", metavar="S1,S2,...", help="Target width(s) (< 0.2887); several write one output each, in one pass: put {sigma_rel} in --output.")] = None,
    gamma: Gamma = None,
    at_step: Annotated[Optional[int], typer.Option("--at-step", metavar="STEP", help="Reconstruct the EMA at step T (default: the latest snapshot).")] = None,
    fmt: Format = None, dtype: Dtype = "keep", include: Include = None, exclude: Exclude = None,
    allow_nonfinite: AllowNonfinite = False, verify: Verify = False, threads: Threads = 0, force: Force = False,
    allow_copy_only: AllowCopyOnly = False, quiet: Quiet = False, as_json: Json = False,
    saturate: Saturate = False, state_key: StateKey = None, skip_missing: SkipMissing = False,
    storage_option: StorageOption = None,
):
    t0 = time.perf_counter()
    series_pairs = []
    for item in series:
        s_rel, sep, where = item.partition("=")
        if not sep or not where:
            raise UsageError(f"--from takes SIGMA_REL=DIR_OR_GLOB (got {item!r})")
        series_pairs.append((s_rel, where))
    widths = [w.strip() for w in sigma_rel.split(",") if w.strip()] if sigma_rel is not None else [None]
    targets = api._posthoc_targets(series_pairs, api.expand_path(output), widths, gamma=gamma, at_step=at_step,
                                   dtype=dtype, include=include, exclude=exclude, allow_nonfinite=allow_nonfinite,
                                   threads=threads, allow_copy_only=allow_copy_only, saturate=saturate,
                                   state_key=state_key, skip_missing=skip_missing,
                                   storage_options=storage.parse_options(storage_option))
    _execute([], None, None, fmt, force=force, quiet=quiet, as_json=as_json, verify=verify, t0=t0, targets=targets)


# ------------------------------------------------------------------ plan


@app.command(help="Show the order, step and weight of each checkpoint without reading tensor data.")
def plan(
    inputs: Inputs,
    swa: Swa = False, decay: Decay = None, num_updates: NumUpdates = False, zero_debias: ZeroDebias = False,
    weights: Weights = None, decay_per: DecayPer = "checkpoint", interp: Interp = "linear",
    half_life: HalfLife = None, sigma_rel: SigmaRel = None, gamma: Gamma = None, tf_exact: TfExact = False,
    last_n: LastN = None, start_step: StartStep = None, every: Every = None,
    metrics: Metrics = None, metric: Metric = None, top_k: TopK = None, maximize: Maximize = False, minimize: Minimize = False,
    order: Order = "step", include: Include = None, exclude: Exclude = None,
    allow_copy_only: AllowCopyOnly = False, state_key: StateKey = None, skip_missing: SkipMissing = False,
    storage_option: StorageOption = None, quiet: Quiet = False, as_json: Json = False,
):
    ui = render.UI(quiet=quiet)  # first: warnings while planning honour --quiet
    opts = api._options(
        _spec(swa, decay, num_updates, zero_debias, weights, decay_per, interp, half_life, sigma_rel, gamma, tf_exact),
        select=api.Select(last_n=last_n, start_step=start_step, every=every, metrics=metrics, metric=metric,
                          top_k=top_k, maximize=_maximize(maximize, minimize)),
        order=order, include=include, exclude=exclude, allow_copy_only=allow_copy_only, state_key=state_key,
        skip_missing=skip_missing, storage_options=storage.parse_options(storage_option),
    )
    pool = engine.ReaderPool()
    try:
        p = engine.make_plan(_paths(inputs), opts, pool=pool)
    finally:
        pool.close()
    doc = render.plan_json(p)
    if as_json:  # stdout holds the one JSON document
        _emit_json(doc)
    else:  # the table is the primary output: stdout (plain text when it is not a terminal)
        ui.plan_table(p, doc)
    ui.warnings(p.warnings)


# ------------------------------------------------------------------ inspect


@app.command(help="List a checkpoint's tensors: name, dtype, shape, size, and what ema-avg does with each.")
def inspect(
    inputs: Inputs,
    include: Include = None, exclude: Exclude = None,
    suffix: Suffix = "ExponentialMovingAverage",
    state_key: StateKey = None, storage_option: StorageOption = None, as_json: Json = False, quiet: Quiet = False,
):
    from ema_cli import inspect as inspect_mod

    ui = render.UI(quiet=quiet)
    docs = inspect_mod.inspect(_paths(inputs), include=include or [], exclude=exclude or [], suffix=suffix,
                               options=api._source_options(state_key, storage.parse_options(storage_option)))
    if as_json:  # stdout holds the one JSON document
        _emit_json(docs if len(docs) != 1 else docs[0])
    else:  # the tables are the primary output: stdout (plain text when it is not a terminal)
        ui.inspect_tables(docs)


def _register_optional_commands() -> None:
    """Subcommands whose modules live elsewhere (names, post-hoc EMA)."""
    for mod_name in ("ema_cli.cli_names", "ema_cli.cli_posthoc"):
        try:
            mod = __import__(mod_name, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue
        mod.register(app)


_register_optional_commands()


# ------------------------------------------------------------------ entry point


def _command_name(info) -> str:
    return info.name or typer.main.get_command_name(info.callback.__name__)


def _command_names() -> set[str]:
    """The subcommands' names, by typer's naming rule, without building their
    click commands (``app(...)`` builds them, once: 20 ms of start-up each time)."""
    return {_command_name(i) for i in app.registered_commands} | {g.name for g in app.registered_groups if g.name}


def _app_for(name: str) -> typer.Typer:
    """``app`` with only the subcommand ``name`` registered.  Every call of a typer
    app builds the click command of each registered command, reading every option's
    annotations (about 3 ms a command); a run needs only the one it invokes.  The
    root callback stays, so the result is still a group and ``ema-avg NAME ...``
    parses, helps and fails exactly as with the whole app."""
    import copy

    sub = copy.copy(app)
    sub.registered_commands = [i for i in app.registered_commands if _command_name(i) == name]
    sub.registered_groups = [g for g in app.registered_groups if g.name == name]
    return sub


Terminated = _entry.Terminated  # SIGTERM's exception (defined with the handlers, in ema_cli._entry)


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard limit: averaging thousands
    of checkpoints (or shards) needs more than the usual 1024.  The reader pool
    (engine.ReaderPool) keeps the number of open readers under a quarter of
    whatever limit is in force."""
    try:
        import resource
    except ImportError:
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and soft >= hard):
        return
    for want in ([hard] if hard != resource.RLIM_INFINITY else []) + [1 << 20, 1 << 16]:
        if want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return
        except (OSError, ValueError):
            continue


_ROOT_OPTIONS = ("--help", "-h", "--version", "-V", "--install-completion", "--show-completion")

USAGE = """Usage: ema-avg [average] INPUT... -o OUT [OPTIONS]
       ema-avg COMMAND [ARGS]...

Commands: {commands}
Run 'ema-avg --help' for the options, 'ema-avg COMMAND --help' for a command's."""


def _looks_like_path(arg: str) -> bool:
    """Whether a first argument that is not a command name is meant as an input path."""
    if os.sep in arg or "/" in arg or "." in arg or glob.has_magic(arg) or os.path.lexists(arg):
        return True
    expanded = api.expand_path(arg)
    return os.path.lexists(expanded) or bool(glob.glob(glob.escape(expanded) + ".*"))  # a TF prefix `model`


def _unknown_command(arg: str, commands: list[str]) -> str | None:
    """``unknown command 'inpsect' (did you mean 'inspect'?)`` for a first argument
    that is no path and close to a command name; None otherwise (an input)."""
    if arg.startswith("-") or _looks_like_path(arg):
        return None
    close = difflib.get_close_matches(arg, commands, n=1, cutoff=0.6)
    if not close:
        return None
    return f"unknown command {arg!r} (did you mean {close[0]!r}?)"


def _wants_json(args: list[str]) -> bool:
    head = args[: args.index("--")] if "--" in args else args
    return "--json" in head


def _report(message: str, code: int, *, as_json: bool, err: BaseException | None = None) -> int:
    """One ``error: ...`` line on stderr; with --json also ``{"error": {...}}`` on stdout."""
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        _emit_json({"error": {"message": message, "path": getattr(err, "path", None) or getattr(err, "filename", None),
                              "tensor": getattr(err, "tensor", None), "exit_code": code}})
    return code


def main(argv: list[str] | None = None) -> None:
    _entry.install_signal_handlers()  # (again: main may be called directly, not through ema_cli._entry)
    raise_open_files_limit()
    import warnings

    warnings.filterwarnings("ignore", category=api.EmaWarning)  # the CLI prints them as `warning: ...` lines
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-V"):
        print(f"ema-avg {__version__}")
        sys.exit(0)
    if "_EMA_AVG_COMPLETE" in os.environ:  # the shell asks for completions (--install-completion)
        app(prog_name="ema-avg")
        return
    commands = sorted(_command_names())
    if not args:  # a bare `ema-avg`: the usage, exit 2 (a usage error)
        order = [c for c in ("average", "plan", "inspect", "posthoc", "restore-map", "rename") if c in commands]
        print(USAGE.format(commands=", ".join(order + [c for c in commands if c not in order])), file=sys.stderr)
        sys.exit(EXIT_USAGE)
    as_json = _wants_json(args)
    if args[0] not in commands and args[0] not in _ROOT_OPTIONS:
        unknown = _unknown_command(args[0], commands)
        if unknown is not None:
            sys.exit(_report(unknown, EXIT_USAGE, as_json=as_json))
        args.insert(0, "average")
    if args and args[0] == "-h":
        args[0] = "--help"
    code = 0
    try:
        runner = _app_for(args[0]) if args[0] in commands else app
        rv = runner(args=args, prog_name="ema-avg", standalone_mode=False)
        if rv == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into a returned 130
            code = _report("interrupted", EXIT_INTERRUPTED, as_json=as_json)
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        code = _report("interrupted", EXIT_INTERRUPTED, as_json=as_json)
    except typer.TyperException as e:  # click's usage errors, vendored by typer
        msg = e.format_message()
        ctx = getattr(e, "ctx", None)
        name = getattr(ctx, "info_name", None)
        where = f" (see 'ema-avg {name} --help')" if name and name != "ema-avg" else ""
        code = _report(f"{' '.join(msg.split())}{where}", getattr(e, "exit_code", EXIT_USAGE) or EXIT_USAGE,
                       as_json=as_json)
    except UsageError as e:
        code = _report(str(e), EXIT_USAGE, as_json=as_json, err=e)
    except EmaError as e:
        code = _report(str(e), EXIT_ERROR, as_json=as_json, err=e)
    except KeyboardInterrupt:
        code = _report("interrupted", EXIT_INTERRUPTED, as_json=as_json)
    except _entry.Terminated:
        code = _report("terminated", _entry.EXIT_TERMINATED, as_json=as_json)
    except MemoryError:
        code = _report("out of memory", EXIT_ERROR, as_json=as_json)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            fd = engine.fd_limit_error(getattr(e, "filename", None), e)
            code = _report(str(fd), EXIT_ERROR, as_json=as_json, err=fd)
        else:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            code = _report(f"{where}{e.strerror or e}", EXIT_ERROR, as_json=as_json, err=e)
    except Exception as e:  # a bug: still one line, unless debugging
        if os.environ.get("EMA_AVG_DEBUG"):
            raise
        code = _report(f"internal error: {type(e).__name__}: {' '.join(str(e).split())} "
                       "(set EMA_AVG_DEBUG=1 for a traceback)", EXIT_ERROR, as_json=as_json)
    sys.stdout.flush()
    sys.exit(code)
