"""The command line: parse, call the library, render.  Nothing else lives here."""

from __future__ import annotations

import errno
import glob
import json
import os
import sys
import time
from typing import Annotated, List, Optional

import typer

from ema_cli import __version__, _entry, engine, formats, render, schedule, storage
from ema_cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, EmaError, UsageError

app = typer.Typer(
    name="ema-avg",
    help="Average a sequence of training checkpoints (EMA, SWA, weighted, per-step and post-hoc EMA).\n\n"
    "`ema-avg ckpts/* -o avg.safetensors` runs `average`, the default command.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# ------------------------------------------------------------------ shared options
Inputs = Annotated[List[str], typer.Argument(help="Checkpoints: files, globs, directories, TF prefixes, sharded indexes.", show_default=False)]
Swa = Annotated[bool, typer.Option("--swa", help="Uniform mean (SWA, decay = n/(1+n)). The default.")]
Decay = Annotated[Optional[float], typer.Option("--decay", help="EMA decay D: TensorFlow's ExponentialMovingAverage over the checkpoints in order.")]
NumUpdates = Annotated[bool, typer.Option("--num-updates", help="TF num_updates: decay at checkpoint k is min(D, (1+n_k)/(10+n_k)), n_k its step.")]
ZeroDebias = Annotated[bool, typer.Option("--zero-debias", help="TF zero-debiased EMA: start at zero, divide by 1 - prod(decays).")]
Weights = Annotated[Optional[str], typer.Option("--weights", help="w1,w2,...: weighted average (with --decay: TF weighted_moving_average).")]
DecayPer = Annotated[str, typer.Option("--decay-per", help="checkpoint (TF semantics) or step (per-step EMA from the checkpoints' steps).")]
Interp = Annotated[str, typer.Option("--interp", help="Per-step schedules: trajectory between checkpoints is 'linear' or 'hold'.")]
HalfLife = Annotated[Optional[float], typer.Option("--half-life", help="Per-step EMA with half-life H steps (D = 2**(-1/H)).")]
SigmaRel = Annotated[Optional[float], typer.Option("--sigma-rel", help="EDM2 power-function EMA of relative width S (< 0.2887) at the last step.")]
Gamma = Annotated[Optional[float], typer.Option("--gamma", help="EDM2 power-function EMA with exponent G at the last step.")]
TfExact = Annotated[bool, typer.Option("--tf-exact", help="Replay TensorFlow's float32 recurrence bit for bit (with --decay).")]
LastN = Annotated[Optional[int], typer.Option("--last-n", help="Keep only the last N checkpoints.")]
StartStep = Annotated[Optional[int], typer.Option("--start-step", help="Keep checkpoints with step >= S.")]
Every = Annotated[Optional[int], typer.Option("--every", help="Keep every K-th checkpoint (starting with the first kept).")]
Metrics = Annotated[Optional[str], typer.Option("--metrics", help="Metrics by step or checkpoint (with --top-k): trainer_state.json or its directory, TensorBoard event file or directory, Keras CSVLogger CSV, CSV or JSON.")]
Metric = Annotated[Optional[str], typer.Option("--metric", help="The column, key or tag in --metrics (e.g. eval_loss); needed when it holds several.")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Average the K best checkpoints by --metrics.")]
Maximize = Annotated[bool, typer.Option("--maximize", help="Higher metric is better.")]
Minimize = Annotated[bool, typer.Option("--minimize", help="Lower metric is better.")]
Order = Annotated[str, typer.Option("--order", help="'step' (by training step) or 'given' (command-line order).")]
Include = Annotated[Optional[List[str]], typer.Option("--include", help="Also average tensors matching REGEX (repeatable).")]
Exclude = Annotated[Optional[List[str]], typer.Option("--exclude", help="Copy, do not average, tensors matching REGEX (repeatable).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Suffix = Annotated[str, typer.Option("--suffix", help="Shadow-name suffix: the shadow of x is x/SUFFIX.")]
# output options shared by average and posthoc
Output = Annotated[str, typer.Option("--output", "-o", help="Output path (format from its suffix).", show_default=False)]
Format = Annotated[Optional[str], typer.Option("--format", help="Output format: safetensors, tf, hdf5, keras or torch.")]
Dtype = Annotated[str, typer.Option("--dtype", help="keep, float32, float16, bfloat16 or float64: dtype of averaged tensors.")]
AllowNonfinite = Annotated[bool, typer.Option("--allow-nonfinite", help="Average NaN/Inf values instead of failing.")]
Verify = Annotated[bool, typer.Option("--verify", help="Reopen the output and check every tensor against what was computed.")]
Threads = Annotated[int, typer.Option("--threads", help="Worker threads (0: one per core, at most 4).")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
StateKey = Annotated[Optional[str], typer.Option("--state-key", metavar="KEY[.KEY...]", help="PyTorch: the key holding the state dict (e.g. state_dict_ema); default: state_dict, model, module, model_state_dict or the top level.")]
SkipMissing = Annotated[bool, typer.Option("--skip-missing", help="Checkpoints a TF 'checkpoint' state file names that are gone: a warning each instead of an error.")]
AllowCopyOnly = Annotated[bool, typer.Option("--allow-copy-only", help="Accept a plan that averages no tensor (every tensor copied from the newest).")]
Dask = Annotated[Optional[str], typer.Option("--dask", metavar="ADDRESS", help="Run the shard tasks on a Dask cluster: a scheduler address (tcp://host:8786) or local:N (a LocalCluster of N worker processes). The output must be sharded: --max-shard-size, or a directory (one shard per worker).")]
StorageOption = Annotated[Optional[List[str]], typer.Option("--storage-option", metavar="KEY=VALUE", help="fsspec option for s3://, gs://, ... paths (repeatable; a.b=v nests), beside the filesystem's own configuration (env vars, ~/.aws, FSSPEC_<PROTOCOL>_<OPTION>).")]
Saturate = Annotated[bool, typer.Option("--saturate", help="Write averages beyond the output dtype's range as its largest finite value (default: an error).")]


def _spec(swa, decay, num_updates, zero_debias, weights, decay_per, interp, half_life, sigma_rel, gamma, tf_exact) -> schedule.Spec:
    ws = None
    if weights is not None:
        try:
            ws = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError:
            raise UsageError(f"--weights takes comma-separated numbers (got {weights!r})") from None
    return schedule.Spec(swa=swa, decay=decay, num_updates=num_updates, zero_debias=zero_debias, weights=ws,
                         decay_per=decay_per, interp=interp, half_life=half_life, sigma_rel=sigma_rel,
                         gamma=gamma, tf_exact=tf_exact)


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
    names: Annotated[str, typer.Option("--names", help="'original' (evaluation-ready) or 'shadow' (x/SUFFIX, TF training layout).")] = "original",
    suffix: Suffix = "ExponentialMovingAverage",
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size", help="Write HF-style shards of at most SIZE (e.g. 2GB) into the OUTPUT directory.")] = None,
    allow_nonfinite: AllowNonfinite = False, verify: Verify = False, threads: Threads = 0, force: Force = False,
    allow_copy_only: AllowCopyOnly = False, quiet: Quiet = False, as_json: Json = False,
    saturate: Saturate = False, state_key: StateKey = None, skip_missing: SkipMissing = False,
    dask: Dask = None, storage_option: StorageOption = None,
):
    t0 = time.perf_counter()
    if names not in ("original", "shadow"):
        raise UsageError("--names is 'original' or 'shadow'")
    opts = engine.Options(
        spec=_spec(swa, decay, num_updates, zero_debias, weights, decay_per, interp, half_life, sigma_rel, gamma, tf_exact),
        order=order, include=include or [], exclude=exclude or [], dtype=dtype, allow_nonfinite=allow_nonfinite,
        last_n=last_n, start_step=start_step, every=every, metrics=metrics, metric=metric, top_k=top_k,
        maximize=_maximize(maximize, minimize), names=names, suffix=suffix,
        max_shard_size=engine.parse_size(max_shard_size) if max_shard_size else None, threads=threads,
        allow_copy_only=allow_copy_only, saturate=saturate, state_key=state_key, skip_missing=skip_missing,
        storage_options=storage.parse_options(storage_option),
    )
    _execute(inputs, opts, output, fmt, force=force, quiet=quiet, as_json=as_json, verify=verify, t0=t0, dask=dask)


def _execute(inputs, opts, output, fmt, *, force, quiet, as_json, verify, t0, targets=None, dask=None) -> None:
    """Plan, write, optionally verify, then render: shared by average and posthoc.

    ``targets``: ``[(opts, output), ...]`` written in one pass over the inputs
    (post-hoc EMA of several widths) instead of ``opts`` and ``output``."""
    targets = targets or [(opts, output)]
    first_opts, first_out = targets[0]
    storage.configure(first_opts.storage_options)
    if dask and first_opts.max_shard_size is None and not formats.is_directory_output(first_out, fmt):
        raise UsageError(f"{first_out}: a Dask run writes each output shard on a worker: give --max-shard-size, "
                         "or a directory output (DIR/: one shard per worker)")
    in_formats = ()
    if fmt is None and first_out.endswith(".ckpt"):  # a TF prefix, or a Lightning file when the inputs are
        paths = inputs or [p for _, ps in first_opts.series for p in ps]
        in_formats = {s.format for s in formats.resolve_inputs(paths, engine.reader_options(first_opts))}
    out_format = formats.output_format(first_out, fmt, in_formats)
    pool = engine.ReaderPool()
    ui = render.UI(quiet=quiet)
    executor = None
    try:
        plans = [engine.make_plan(inputs, o, out_format=out_format, pool=pool) for o, _ in targets]
        t_plan = time.perf_counter() - t0
        ui.warnings(list(dict.fromkeys(w for p in plans for w in p.warnings)))
        if dask:
            from ema_cli.execute import DaskExecutor

            executor = DaskExecutor(dask)
            if first_opts.max_shard_size is None and formats.is_directory_output(first_out, out_format):
                n = executor.worker_count()  # a directory output: one shard per worker
                for p in plans:
                    p.shards = engine.split_shards(p.tasks, n)
        with ui.progress(plans[0]) as on_tensor:
            results = engine.run_many(plans, [out for _, out in targets], out_format, force=force, pool=pool,
                                      on_tensor=on_tensor, timings={"plan_s": t_plan}, verify=verify,
                                      executor=executor)
        for result in results:
            result.timings["total_s"] = time.perf_counter() - t0
    finally:
        if executor is not None:
            executor.close()
        pool.close()
    for result in results:
        ui.summary(result)
    if as_json:
        docs = [render.result_json(r) for r in results]
        _emit_json(docs[0] if len(docs) == 1 else {"outputs": docs})


# ------------------------------------------------------------------ posthoc


@app.command(help="EDM2 post-hoc EMA: reconstruct a power-function EMA of any width from snapshot series.")
def posthoc(
    series: Annotated[List[str], typer.Option("--from", help="S=DIR_OR_GLOB: a series of power-EMA snapshots of relative width S (repeat).", show_default=False)],
    output: Output,
    sigma_rel: Annotated[Optional[str], typer.Option("--sigma-rel", metavar="S1,S2,...", help="Target width(s) (< 0.2887); several write one output each, in one pass: put {sigma_rel} in --output.")] = None,
    gamma: Gamma = None,
    at_step: Annotated[Optional[int], typer.Option("--at-step", help="Reconstruct the EMA at step T (default: the latest snapshot).")] = None,
    fmt: Format = None, dtype: Dtype = "keep", include: Include = None, exclude: Exclude = None,
    allow_nonfinite: AllowNonfinite = False, verify: Verify = False, threads: Threads = 0, force: Force = False,
    allow_copy_only: AllowCopyOnly = False, quiet: Quiet = False, as_json: Json = False,
    saturate: Saturate = False, state_key: StateKey = None, skip_missing: SkipMissing = False,
):
    t0 = time.perf_counter()
    parsed = []
    for item in series:
        s_rel, sep, where = item.partition("=")
        try:
            g = schedule.sigma_rel_to_gamma(float(s_rel))
        except ValueError:
            raise UsageError(f"--from takes SIGMA_REL=DIR_OR_GLOB (got {item!r})") from None
        if not sep or not where:
            raise UsageError(f"--from takes SIGMA_REL=DIR_OR_GLOB (got {item!r})")
        paths = sorted(glob.glob(where)) if glob.has_magic(where) else [where]
        if not paths:
            raise EmaError("no checkpoints match", path=where)
        parsed.append((g, paths))
    widths = [w.strip() for w in sigma_rel.split(",") if w.strip()] if sigma_rel is not None else [None]
    if len(widths) > 1 and gamma is not None:
        raise UsageError("give the targets with --sigma-rel or --gamma, not both")
    if len(widths) > 1 and "{sigma_rel}" not in output:
        raise UsageError("several --sigma-rel targets need '{sigma_rel}' in --output (e.g. -o 'ema-{sigma_rel}.safetensors')")
    if len(set(widths)) < len(widths):
        raise UsageError(f"--sigma-rel lists a width twice ({sigma_rel})")
    targets = []
    for width in widths:
        try:
            s_rel = None if width is None else float(width)
        except ValueError:
            raise UsageError(f"--sigma-rel takes numbers separated by commas (got {sigma_rel!r})") from None
        spec = schedule.Spec(sigma_rel=s_rel, gamma=gamma, at_step=at_step, posthoc_gammas=[])
        opts = engine.Options(spec=spec, include=include or [], exclude=exclude or [], dtype=dtype,
                              allow_nonfinite=allow_nonfinite, threads=threads, series=parsed,
                              allow_copy_only=allow_copy_only, saturate=saturate, state_key=state_key,
                              skip_missing=skip_missing)
        targets.append((opts, output.replace("{sigma_rel}", width) if width is not None else output))
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
    quiet: Quiet = False, as_json: Json = False,
):
    opts = engine.Options(
        spec=_spec(swa, decay, num_updates, zero_debias, weights, decay_per, interp, half_life, sigma_rel, gamma, tf_exact),
        order=order, include=include or [], exclude=exclude or [],
        last_n=last_n, start_step=start_step, every=every, metrics=metrics, metric=metric, top_k=top_k,
        maximize=_maximize(maximize, minimize), allow_copy_only=allow_copy_only, state_key=state_key,
        skip_missing=skip_missing,
    )
    ui = render.UI(quiet=quiet)  # first: warnings while planning honour --quiet
    pool = engine.ReaderPool()
    try:
        p = engine.make_plan(inputs, opts, pool=pool)
    finally:
        pool.close()
    doc = render.plan_json(p)
    if as_json:
        _emit_json(doc)
    if not quiet and (ui.is_terminal or not as_json):
        ui.plan_table(p, doc)
    ui.warnings(p.warnings)


# ------------------------------------------------------------------ inspect


@app.command(help="List a checkpoint's tensors: name, dtype, shape, size, and what ema-avg does with each.")
def inspect(
    inputs: Inputs,
    include: Include = None, exclude: Exclude = None,
    suffix: Suffix = "ExponentialMovingAverage",
    state_key: StateKey = None, as_json: Json = False, quiet: Quiet = False,
):
    from ema_cli import inspect as inspect_mod

    docs = inspect_mod.inspect(inputs, include=include or [], exclude=exclude or [], suffix=suffix,
                               options=(("state_key", state_key),) if state_key else ())
    if as_json:
        _emit_json(docs if len(docs) != 1 else docs[0])
    ui = render.UI(quiet=quiet)
    if not quiet and (ui.is_terminal or not as_json):
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


def _command_names() -> set[str]:
    cmd = typer.main.get_command(app)
    return set(getattr(cmd, "commands", {}))


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


def main(argv: list[str] | None = None) -> None:
    _entry.install_signal_handlers()  # (again: main may be called directly, not through ema_cli._entry)
    raise_open_files_limit()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-V"):
        print(f"ema-avg {__version__}")
        sys.exit(0)
    if args and args[0] not in _command_names() and args[0] not in ("--help", "-h"):
        args.insert(0, "average")
    if args and args[0] == "-h":
        args[0] = "--help"
    code = 0
    try:
        rv = app(args=args, prog_name="ema-avg", standalone_mode=False)
        if rv == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into a returned 130
            print("error: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except typer.TyperException as e:  # click's usage errors, vendored by typer
        msg = e.format_message()
        ctx = getattr(e, "ctx", None)
        name = getattr(ctx, "info_name", None)
        where = f" (see 'ema-avg {name} --help')" if name and name != "ema-avg" else ""
        print(f"error: {' '.join(msg.split())}{where}", file=sys.stderr)
        code = getattr(e, "exit_code", EXIT_USAGE) or EXIT_USAGE
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except EmaError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except _entry.Terminated:
        print("error: terminated", file=sys.stderr)
        code = _entry.EXIT_TERMINATED
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        code = EXIT_ERROR
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            print(f"error: {engine.fd_limit_error(getattr(e, 'filename', None), e)}", file=sys.stderr)
        else:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        code = EXIT_ERROR
    except Exception as e:  # a bug: still one line, unless debugging
        if os.environ.get("EMA_AVG_DEBUG"):
            raise
        print(f"error: internal error: {type(e).__name__}: {' '.join(str(e).split())} "
              "(set EMA_AVG_DEBUG=1 for a traceback)", file=sys.stderr)
        code = EXIT_ERROR
    sys.stdout.flush()
    sys.exit(code)
