"""The Python API: what the command line does, as functions.

Every function here runs in-process, returns a typed result and raises
:class:`~ema_cli.EmaError` (with ``.path`` and ``.tensor``) on bad input; none
of them prints anything or raises ``SystemExit``.  Warnings (what the CLI
prints as ``warning: ...``) are returned in ``Result.warnings`` / ``Plan.warnings``
and issued as :class:`EmaWarning` through Python's :mod:`warnings`.

    >>> import ema_cli
    >>> res = ema_cli.average("ckpts/", "avg.safetensors", decay=0.999)
    >>> res.weights, res.output_dtype, res.bytes_written

The command line (``ema_cli.cli``) is a layer over the private helpers below
(``_options``, ``_run``): it adds parsing, progress bars and rendering.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import time
import warnings as _warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, NamedTuple, Union

from ema_cli.errors import EmaError, UsageError

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Mapping[str, Any]
#: what ``average`` takes as inputs: paths (files, globs, directories, TF prefixes,
#: sharded indexes), or in-memory checkpoints: state dicts (name -> numpy array or
#: torch tensor), or ``(step, state dict)`` pairs (any iterable, consumed once)
Inputs = Union[PathLike, Sequence[PathLike], Iterable[StateDict], Iterable[tuple[int, StateDict]]]


class EmaWarning(UserWarning):
    """A warning ema-avg gives about the inputs or the schedule (the CLI's ``warning: ...`` lines)."""


# --------------------------------------------------------------------------- result types


@dataclass(frozen=True)
class Select:
    """Which checkpoints are averaged (applied after ordering, in this order):
    ``start_step`` (steps >= S), ``every`` (every K-th of those), ``last_n``,
    then the ``top_k`` best by ``metric`` in ``metrics`` (a trainer_state.json,
    TensorBoard events, CSV or JSON; ``maximize`` True/False)."""

    last_n: int | None = None
    start_step: int | None = None
    every: int | None = None
    top_k: int | None = None
    metrics: str | None = None
    metric: str | None = None
    maximize: bool | None = None


@dataclass(frozen=True)
class CheckpointRow:
    """One input of a plan, in averaging order."""

    path: str
    step: int | None
    step_from: str  # "tensor", "name" or "order"
    weight: float
    selected: bool
    metric: float | None = None


@dataclass(frozen=True)
class Plan:
    """What ``plan`` shows (and ``plan --json`` prints): the order, step and
    weight of every checkpoint, before any tensor is read."""

    mode: str
    params: dict
    checkpoints: list[CheckpointRow]
    sum_abs_weights: float
    newest: str
    warnings: list[str]
    _doc: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def weights(self) -> list[float]:
        """The weights of the selected checkpoints, in averaging order (they sum to 1)."""
        return [c.weight for c in self.checkpoints if c.selected]

    def as_dict(self) -> dict:
        """The JSON document ``ema-avg plan --json`` prints."""
        return _copy(self._doc)


@dataclass(frozen=True)
class Result:
    """What ``average`` / ``posthoc`` wrote: the fields ``--json`` prints."""

    output: str  # absolute path
    format: str
    files: list[str]
    mode: str
    params: dict
    checkpoints: list[CheckpointRow]
    output_dtype: str | list[str] | None  # dtype of the averaged tensors (a list if they differ)
    dtypes: dict[str, int]  # every output tensor's dtype: {dtype: count}
    verified: bool
    averaged: int
    copied: int
    skipped: list[str]
    bytes_written: int
    timings: dict[str, float]
    warnings: list[str]
    _doc: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.checkpoints if c.selected]

    def as_dict(self) -> dict:
        """The JSON document ``ema-avg average --json`` prints."""
        return _copy(self._doc)


@dataclass(frozen=True)
class TensorRow:
    """One tensor of a checkpoint, as ``inspect`` lists it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    role: str  # "averaged", "copied" or "shadow"
    kind: str  # "parameter", "buffer", "optimizer", "counter" or "other"
    why: str
    shadow_of: str | None = None


@dataclass(frozen=True)
class RenameResult:
    """What ``rename`` wrote (the fields ``rename --json`` prints)."""

    output: str
    format: str
    files: list[str]
    checkpoint: str
    direction: str
    suffix: str
    renamed: int
    dropped: int
    tensors: int
    rewritten: list[str]  # tensors whose value was rewritten for the new names (a TF2 object graph)
    names: dict[str, str]  # {input name: output name} for the renamed tensors
    bytes_written: int
    timings: dict[str, float]
    warnings: list[str]

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("output", "format", "files", "checkpoint", "direction", "suffix",
                                           "renamed", "dropped", "tensors", "rewritten", "names",
                                           "bytes_written")}
        d["timings"] = {k: round(v, 6) for k, v in self.timings.items()}
        return d


class Progress(NamedTuple):
    """Passed to ``average(progress=...)`` after each tensor is written."""

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


def _copy(doc):
    import copy

    return copy.deepcopy(doc)


def _rows(doc: dict) -> list[CheckpointRow]:
    return [CheckpointRow(c["path"], c["step"], c["step_from"], c["weight"], c["selected"], c.get("metric"))
            for c in doc["checkpoints"]]


def _plan_from_doc(doc: dict) -> Plan:
    return Plan(doc["mode"], doc["params"], _rows(doc), doc["sum_abs_weights"], doc["newest"],
                list(doc["warnings"]), doc)


def _result_from_doc(doc: dict, warnings: list[str]) -> Result:
    doc["warnings"] = list(dict.fromkeys(list(doc["warnings"]) + list(warnings)))
    t = doc["tensors"]
    return Result(doc["output"], doc["format"], list(doc["files"]), doc["mode"], doc["params"], _rows(doc),
                  doc["dtype"], dict(doc["dtypes"]), doc["verified"], t["averaged"], t["copied"], list(t["skipped"]),
                  doc["bytes_written"], dict(doc["timings"]), doc["warnings"], doc)


# --------------------------------------------------------------------------- paths and options


def expand_path(path: PathLike) -> str:
    """``~`` and ``$VAR`` expanded, unless the path exists as written (a file really
    named ``$x``).  Used for every path ema-avg itself interprets: quoted globs,
    ``--output=~/x``, ``--metrics``, ``--from S=~/snapshots``.

    Args:
        path: a path or glob, as given.

    Returns:
        The path to use (unchanged when it exists or holds no ``~``/``$``).
    """
    p = os.fspath(path)
    if os.path.lexists(p) or ("~" not in p and "$" not in p):
        return p
    return os.path.expanduser(os.path.expandvars(p))


def _weights(weights) -> list[float] | None:
    if weights is None:
        return None
    if isinstance(weights, str):
        try:
            return [float(w) for w in weights.split(",") if w.strip()]
        except ValueError:
            raise UsageError(f"--weights takes comma-separated numbers (got {weights!r})") from None
    try:
        return [float(w) for w in weights]
    except (TypeError, ValueError):
        raise UsageError(f"weights must be numbers (got {weights!r})") from None


_MODE_ALIASES = {"mean": "swa", "uniform": "swa"}


def _spec(*, mode=None, decay=None, num_updates=False, zero_debias=False, weights=None, decay_per="checkpoint",
          interp="linear", half_life=None, sigma_rel=None, gamma=None, tf_exact=False, swa=False):
    from ema_cli import schedule

    m = _MODE_ALIASES.get(mode, mode) if mode is not None else None
    if m == "swa":
        swa = True
    if m == "ema-per-step" and decay is not None:
        decay_per = "step"
    spec = schedule.Spec(swa=swa, decay=decay, num_updates=num_updates, zero_debias=zero_debias,
                         weights=_weights(weights), decay_per=decay_per, interp=interp, half_life=half_life,
                         sigma_rel=sigma_rel, gamma=gamma, tf_exact=tf_exact)
    spec.validate()
    if m is not None:
        got = _MODE_ALIASES.get(spec.mode, spec.mode)
        if got != m:
            known = "swa, ema, weighted, weighted-ema, ema-per-step, power-ema"
            raise UsageError(f"mode {mode!r} does not match the parameters given (they mean {spec.mode!r}; "
                             f"modes: {known}; each needs its parameter: ema needs decay, ema-per-step decay or "
                             "half_life, power-ema sigma_rel or gamma)")
    return spec


def _select(select) -> Select:
    if select is None:
        return Select()
    if isinstance(select, Select):
        return select
    if isinstance(select, Mapping):
        try:
            return Select(**select)
        except TypeError as e:
            raise UsageError(f"select: {e}") from None
    raise UsageError(f"select must be an ema_cli.Select or a mapping (got {type(select).__name__})")


def _options(spec, *, select=None, order="step", include=(), exclude=(), dtype="keep", allow_nonfinite=False,
             names="original", suffix="ExponentialMovingAverage", max_shard_size=None, threads=0,
             allow_copy_only=False, saturate=False, state_key=None, skip_missing=False, series=None,
             storage_options=None):
    """The engine's options from the API's (and the CLI's) arguments."""
    from ema_cli import dtypes, engine

    sel = _select(select)
    if names not in ("original", "shadow"):
        raise UsageError("--names is 'original' or 'shadow'")
    if isinstance(max_shard_size, str):
        max_shard_size = engine.parse_size(max_shard_size)
    elif max_shard_size is not None and max_shard_size <= 0:
        raise UsageError("--max-shard-size must be positive")
    return engine.Options(
        spec=spec, order=order, include=list(include or []), exclude=list(exclude or []),
        dtype=dtypes.output_choice(dtype), allow_nonfinite=allow_nonfinite, last_n=sel.last_n,
        start_step=sel.start_step, every=sel.every,
        metrics=expand_path(sel.metrics) if sel.metrics is not None else None, metric=sel.metric,
        top_k=sel.top_k, maximize=sel.maximize, names=names, suffix=suffix, max_shard_size=max_shard_size,
        threads=threads, allow_copy_only=allow_copy_only, saturate=saturate, state_key=state_key,
        skip_missing=skip_missing, series=series, storage_options=dict(storage_options or {}),
    )


# --------------------------------------------------------------------------- in-memory inputs


def _source_options(state_key: str | None, storage_options) -> tuple[tuple[str, str], ...]:
    """The reader options a Source carries, for the functions that open one
    checkpoint (inspect, restore_map, rename): ``planning.reader_options``."""
    from ema_cli import planning

    return planning.reader_options(planning.Options(state_key=state_key, storage_options=dict(storage_options or {})))


def _is_pathlike(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _to_numpy(name: str, value):
    """(array, is_torch) for one tensor of an in-memory state dict."""
    import numpy as np

    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):  # torch.Tensor
        import torch

        t = value.detach().cpu().contiguous()
        try:
            if t.dtype == torch.bfloat16:
                import ml_dtypes

                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16), True
            return t.numpy(), True
        except (TypeError, RuntimeError) as e:
            raise EmaError(f"cannot take this torch tensor ({t.dtype}): {e}", tensor=name) from None
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 (anything array-like may fail its own way)
        raise EmaError(f"not an array: {type(value).__name__} ({e})", tensor=name) from None
    if arr.dtype.kind in "OSUV":
        raise EmaError(f"in-memory tensors must be numeric arrays (got dtype {arr.dtype})", tensor=name)
    return arr, False


def _spool(items: Iterable, directory: str) -> list[str]:
    """Write in-memory checkpoints to safetensors files in ``directory``, one at a
    time (an iterator is consumed lazily: one checkpoint in memory at once); the
    step is in the file name (``step_N``), so the engine orders them as usual."""
    import numpy as np
    from safetensors.numpy import save_file

    paths: list[str] = []
    seen: set[int] = set()
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            step, mapping = i, item
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping):
            try:
                step = int(item[0])
            except (TypeError, ValueError):
                raise UsageError(f"in-memory checkpoint {i}: the step must be an integer (got {item[0]!r})") from None
            mapping = item[1]
        else:
            raise UsageError(f"in-memory checkpoint {i}: expected a mapping of name -> array, or a "
                             f"(step, mapping) pair (got {type(item).__name__})")
        if step in seen:
            raise UsageError(f"in-memory checkpoints: step {step} given twice")
        seen.add(step)
        arrays, torch_any = {}, False
        for name, value in mapping.items():
            if not isinstance(name, str) or not name:
                raise UsageError(f"in-memory checkpoint {i}: tensor names must be non-empty strings (got {name!r})")
            arr, is_torch = _to_numpy(name, value)
            torch_any |= is_torch
            arrays[name] = np.require(arr, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if not arrays:
            raise UsageError(f"in-memory checkpoint {i} holds no tensors")
        path = os.path.join(directory, f"step_{step}.safetensors")
        try:
            save_file(arrays, path, metadata={"format": "pt"} if torch_any else None)
        except OSError as e:
            raise EmaError(f"cannot spool an in-memory checkpoint: {e.strerror}", path=directory) from None
        paths.append(path)
        del arrays, mapping, item
    if not paths:
        raise UsageError("no input checkpoints (the in-memory inputs were empty)")
    return paths


@contextlib.contextmanager
def _resolved_inputs(inputs):
    """``(paths, labels)``: paths as given (``~`` and ``$VAR`` expanded), or the
    spooled files of in-memory checkpoints (removed afterwards) with a label per
    file, ``<memory:step N>``, used in results instead of the temporary path."""
    if _is_pathlike(inputs):
        yield [expand_path(inputs)], {}
        return
    if isinstance(inputs, Mapping):
        inputs = [inputs]
    if isinstance(inputs, Iterator):  # a generator: of paths (Path.glob) or of checkpoints (consumed lazily)
        import itertools

        try:
            first = next(inputs)
        except StopIteration:
            raise UsageError("no input checkpoints (the inputs were empty)") from None
        inputs = [first, *inputs] if _is_pathlike(first) else itertools.chain([first], inputs)
    if isinstance(inputs, Sequence) and inputs and all(_is_pathlike(x) for x in inputs):
        yield [expand_path(x) for x in inputs], {}
        return
    if isinstance(inputs, Sequence) and any(_is_pathlike(x) for x in inputs):
        raise UsageError("inputs are either paths or in-memory checkpoints, not a mix")
    if not isinstance(inputs, Iterable):
        raise UsageError(f"inputs must be paths, state dicts or (step, state dict) pairs (got {type(inputs).__name__})")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ema-avg-mem-") as d:
        paths = _spool(inputs, d)
        labels = {os.path.abspath(p): f"<memory:step {os.path.basename(p)[5:-12]}>" for p in paths}
        yield paths, labels


def _relabel(doc: dict, labels: dict[str, str]) -> dict:
    if not labels:
        return doc
    for c in doc.get("checkpoints", []):
        c["path"] = labels.get(c["path"], c["path"])
    doc["newest"] = labels.get(doc.get("newest"), doc.get("newest"))
    doc["warnings"] = [_replace_all(w, labels) for w in doc.get("warnings", [])]
    return doc


def _replace_all(text: str, labels: dict[str, str]) -> str:
    for k, v in labels.items():
        text = text.replace(k, v)
    return text


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _library_call(live: bool = False):
    """Around each public function: warnings collected (not printed; ``live``:
    issued as EmaWarning as they come, for a call that runs until stopped), OS
    errors turned into EmaError, never SystemExit."""
    from ema_cli import notices

    with notices.capture(_warn_now if live else None) as got:
        try:
            yield got
        except EmaError:
            raise
        except OSError as e:
            import errno

            if e.errno in (errno.EMFILE, errno.ENFILE):
                from ema_cli import engine

                raise engine.fd_limit_error(getattr(e, "filename", None), e) from e
            raise EmaError(e.strerror or str(e), path=getattr(e, "filename", None)) from e
        except SystemExit as e:  # (nothing below raises it; a library never exits the process)
            raise EmaError(f"internal: exit {e.code}") from None


def _warn_now(text: str) -> None:
    _warnings.warn(text, EmaWarning, stacklevel=2)


def _issue(warnings: list[str]) -> None:
    for w in warnings:
        _warnings.warn(w, EmaWarning, stacklevel=3)


def _output_format(paths: list[str], first_opts, first_out: str, fmt: str | None) -> str | None:
    from ema_cli import engine, formats

    in_formats = ()
    if fmt is None and first_out.endswith(".ckpt"):  # a TF prefix, or a Lightning file when the inputs are
        paths = paths or [p for _, ps in first_opts.series for p in ps]
        in_formats = {s.format for s in formats.resolve_inputs(paths, engine.reader_options(first_opts))}
    return formats.output_format(first_out, fmt, in_formats)


def _run(inputs: list[str], targets: list, fmt: str | None, *, force: bool, verify: bool,
         on_plans: Callable | None = None, progress_cm: Callable | None = None, t0: float | None = None,
         dask: str | None = None) -> list:
    """Plan and write ``targets`` (``[(Options, output), ...]``, one pass over the
    inputs): the engine's results.  ``on_plans(plans)`` runs between planning and
    writing (the CLI prints the warnings there); ``progress_cm(plan)`` is a
    context manager yielding the ``on_tensor`` callback (or None).  ``dask``: a
    scheduler address or ``local:N``: the shard tasks run on that cluster."""
    from ema_cli import engine, formats

    t0 = time.perf_counter() if t0 is None else t0
    first_opts, first_out = targets[0]
    directory = formats.is_directory_output(first_out, fmt)
    if dask and first_opts.max_shard_size is None and not directory:
        raise UsageError(f"{first_out}: a Dask run writes each output shard on a worker: give --max-shard-size, "
                         "or a directory output (DIR/: one shard per worker)")
    out_format = _output_format(inputs, first_opts, first_out, fmt)
    pool = engine.ReaderPool()
    executor = None
    try:
        plans = [engine.make_plan(inputs, o, out_format=out_format, pool=pool) for o, _ in targets]
        t_plan = time.perf_counter() - t0
        if on_plans is not None:
            on_plans(plans)
        if dask:
            from ema_cli.execute import DaskExecutor

            executor = DaskExecutor(dask)
            if first_opts.max_shard_size is None:  # a directory output: one shard per worker
                n = executor.worker_count()
                for p in plans:
                    p.shards = engine.split_shards(p.tasks, n)
        cm = progress_cm(plans[0]) if progress_cm is not None else contextlib.nullcontext(None)
        with cm as on_tensor:
            results = engine.run_many(plans, [out for _, out in targets], out_format, force=force, pool=pool,
                                      on_tensor=on_tensor, timings={"plan_s": t_plan}, verify=verify,
                                      executor=executor)
        for result in results:
            result.timings["total_s"] = time.perf_counter() - t0
    finally:
        if executor is not None:
            executor.close()
        pool.close()
    return results


def _progress_cm(progress: Callable[[Progress], None] | None):
    if progress is None:
        return None

    @contextlib.contextmanager
    def cm(plan):
        from ema_cli import dtypes

        sizes = {t.out_name: dtypes.itemsize(t.out_dtype) * t.info.numel for t in plan.tasks}
        total_b, total_n = sum(sizes.values()), len(plan.tasks)
        lock = threading.Lock()
        done = [0, 0]

        def on_tensor(task):
            with lock:
                done[0] += 1
                done[1] += sizes.get(task.out_name, 0)
                state = Progress(done[0], total_n, done[1], total_b)
            progress(state)

        yield on_tensor

    return cm


# --------------------------------------------------------------------------- public functions


def average(
    inputs: Inputs,
    output: PathLike,
    *,
    mode: str | None = None,
    decay: float | None = None,
    num_updates: bool = False,
    zero_debias: bool = False,
    weights: Sequence[float] | str | None = None,
    decay_per: Literal["checkpoint", "step"] = "checkpoint",
    interp: Literal["linear", "hold"] = "linear",
    half_life: float | None = None,
    sigma_rel: float | None = None,
    gamma: float | None = None,
    tf_exact: bool = False,
    select: Select | Mapping[str, Any] | None = None,
    order: Literal["step", "given"] = "step",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: str = "keep",
    names: Literal["original", "shadow"] = "original",
    suffix: str = "ExponentialMovingAverage",
    format: str | None = None,
    max_shard_size: int | str | None = None,
    allow_nonfinite: bool = False,
    saturate: bool = False,
    allow_copy_only: bool = False,
    state_key: str | None = None,
    skip_missing: bool = False,
    verify: bool = False,
    force: bool = False,
    threads: int = 0,
    progress: Callable[[Progress], None] | None = None,
    dask: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Result:
    """Average checkpoints into ``output`` (what ``ema-avg average`` does).

    Args:
        inputs: a path (file, glob, directory, TF prefix, sharded index) or a list
            of them; or in-memory checkpoints: a list of state dicts (name -> numpy
            array or torch tensor, averaged in list order) or an iterable of
            ``(step, state dict)`` pairs (ordered by step; an iterator is consumed
            one checkpoint at a time: each is spooled to a temporary safetensors
            file, removed afterwards).
        output: the output path; its suffix gives the format (``format`` overrides),
            ``DIR/`` is a directory output in the inputs' format.
        mode: optional check of the averaging mode the other parameters imply
            (``"swa"``/``"mean"``, ``"ema"``, ``"weighted"``, ``"weighted-ema"``,
            ``"ema-per-step"``, ``"power-ema"``); a mismatch raises EmaError.
        decay: EMA decay (TensorFlow's ExponentialMovingAverage over the checkpoints).
        num_updates, zero_debias, tf_exact: TensorFlow's EMA variants (need ``decay``).
        weights: one weight per selected checkpoint (normalised), or ``"w1,w2,..."``.
        decay_per: ``"step"``: per-step EMA from the checkpoints' steps.
        interp: per-step schedules: the trajectory between checkpoints, ``"linear"`` or ``"hold"``.
        half_life: per-step EMA with this half-life in steps.
        sigma_rel, gamma: EDM2 power-function EMA at the last selected step.
        select: windows and top-k (:class:`Select`, or a mapping of its fields).
        order: ``"step"`` (training step) or ``"given"``.
        include, exclude: regular expressions: also average / only copy matching tensors.
        dtype: dtype of the averaged tensors: ``"keep"``, ``"float32"``, ``"float16"``,
            ``"bfloat16"``, ``"float64"`` or an alias (``bf16``, ``fp16``, ``half``,
            ``fp32``, ``float``, ``fp64``).
        names, suffix: ``"shadow"`` writes averages under ``x/SUFFIX`` (TF training layout).
        format: output format (``safetensors``, ``tf``, ``hdf5``, ``keras``, ``torch``).
        max_shard_size: bytes (or ``"2GB"``): HF shards in the output directory.
        allow_nonfinite, saturate, allow_copy_only, state_key, skip_missing: as the CLI options.
        verify: reopen the staged output and check every tensor before committing it.
        force: replace an existing output (only an earlier ema-avg output, for directories).
        threads: worker threads (0: one per core, at most 4).
        progress: called with a :class:`Progress` after each tensor (from worker threads).
        dask: run the shard tasks on a Dask cluster: a scheduler address
            (``"tcp://host:8786"``) or ``"local:N"`` (a LocalCluster of N worker
            processes); the output must be sharded (``max_shard_size``, or a
            directory output: one shard per worker).
        storage_options: fsspec options for ``s3://``, ``gs://``, ... paths
            (``{"endpoint_url": ...}``), beside the filesystem's own configuration.

    Returns:
        A :class:`Result`: the fields ``ema-avg average --json`` prints (``as_dict()``).

    Raises:
        EmaError: bad input, options or data (``.path`` and ``.tensor`` say where);
            nothing is written at ``output`` then.
    """
    t0 = time.perf_counter()
    with _library_call() as captured:
        spec = _spec(mode=mode, decay=decay, num_updates=num_updates, zero_debias=zero_debias, weights=weights,
                     decay_per=decay_per, interp=interp, half_life=half_life, sigma_rel=sigma_rel, gamma=gamma,
                     tf_exact=tf_exact)
        opts = _options(spec, select=select, order=order, include=include, exclude=exclude, dtype=dtype,
                        allow_nonfinite=allow_nonfinite, names=names, suffix=suffix, max_shard_size=max_shard_size,
                        threads=threads, allow_copy_only=allow_copy_only, saturate=saturate, state_key=state_key,
                        skip_missing=skip_missing, storage_options=storage_options)
        out = expand_path(output)
        with _resolved_inputs(inputs) as (paths, labels):
            results = _run(paths, [(opts, out)], format, force=force, verify=verify,
                           progress_cm=_progress_cm(progress), t0=t0, dask=dask)
            docs = [_doc_of(r, labels) for r in results]
    res = _result_from_doc(docs[0], [_replace_all(w, labels) for w in captured])
    _issue(res.warnings)
    return res


def _doc_of(result, labels) -> dict:
    from ema_cli import render

    return _relabel(render.result_json(result), labels)


def plan(
    inputs: Inputs,
    *,
    mode: str | None = None,
    decay: float | None = None,
    num_updates: bool = False,
    zero_debias: bool = False,
    weights: Sequence[float] | str | None = None,
    decay_per: Literal["checkpoint", "step"] = "checkpoint",
    interp: Literal["linear", "hold"] = "linear",
    half_life: float | None = None,
    sigma_rel: float | None = None,
    gamma: float | None = None,
    tf_exact: bool = False,
    select: Select | Mapping[str, Any] | None = None,
    order: Literal["step", "given"] = "step",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_copy_only: bool = False,
    state_key: str | None = None,
    skip_missing: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Plan:
    """The order, step and weight of every checkpoint, reading no tensor data
    (what ``ema-avg plan --json`` prints).

    Args:
        inputs: as for :func:`average` (paths or in-memory checkpoints).
        mode, decay, ...: the schedule and selection parameters of :func:`average`.
        storage_options: as for :func:`average`.

    Returns:
        A :class:`Plan` (``as_dict()``: the ``plan --json`` document).

    Raises:
        EmaError: unreadable inputs, disagreeing tensors, bad options.
    """
    from ema_cli import engine, render

    with _library_call() as captured:
        spec = _spec(mode=mode, decay=decay, num_updates=num_updates, zero_debias=zero_debias, weights=weights,
                     decay_per=decay_per, interp=interp, half_life=half_life, sigma_rel=sigma_rel, gamma=gamma,
                     tf_exact=tf_exact)
        opts = _options(spec, select=select, order=order, include=include, exclude=exclude,
                        allow_copy_only=allow_copy_only, state_key=state_key, skip_missing=skip_missing,
                        storage_options=storage_options)
        with _resolved_inputs(inputs) as (paths, labels):
            pool = engine.ReaderPool()
            try:
                p = engine.make_plan(paths, opts, pool=pool)
            finally:
                pool.close()
            doc = _relabel(render.plan_json(p), labels)
            doc["warnings"] = list(dict.fromkeys(doc["warnings"] + [_replace_all(w, labels) for w in captured]))
    out = _plan_from_doc(doc)
    _issue(out.warnings)
    return out


def watch(
    directory: PathLike,
    output: PathLike,
    *,
    decay: float | None = None,
    num_updates: bool = False,
    decay_per: Literal["checkpoint", "step"] = "checkpoint",
    interp: Literal["linear", "hold"] = "linear",
    half_life: float | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: str = "keep",
    format: str | None = None,
    allow_nonfinite: bool = False,
    state_key: str | None = None,
    until_step: int | None = None,
    poll: float = 2.0,
    stop: threading.Event | None = None,
    on_update: Callable[[Result], None] | None = None,
) -> Result | None:
    """Keep ``output`` the running average of the checkpoints appearing in
    ``directory`` (what ``ema-avg --watch DIR`` does): each new complete
    checkpoint is read once and folded into the float64 state (the uniform mean:
    bit for bit the batch :func:`average`; an EMA: within float64 rounding), and
    the output is rewritten atomically.

    Args:
        directory: where training writes checkpoints (files or checkpoint sub-directories).
        output: the running average (outside ``directory``, or ignored in it).
        decay, num_updates, decay_per, interp, half_life: the EMA (default: the uniform mean).
        include, exclude, dtype, format, allow_nonfinite, state_key: as for :func:`average`.
        until_step: return once a checkpoint with this step or later is averaged.
        poll: seconds between scans of ``directory``.
        stop: set this event to return (from another thread).
        on_update: called with a :class:`Result` after each update.

    Returns:
        The last update's :class:`Result` (None if no checkpoint was averaged).

    Raises:
        EmaError: bad options, a checkpoint that does not match the earlier ones.
    """
    from ema_cli import watching as watch_mod

    with _library_call(live=True):  # a checkpoint skipped, a layout to fix: said while it runs
        spec = _spec(decay=decay, num_updates=num_updates, decay_per=decay_per, interp=interp, half_life=half_life)
        opts = _options(spec, include=include, exclude=exclude, dtype=dtype, allow_nonfinite=allow_nonfinite,
                        state_key=state_key, allow_copy_only=True)
        cb = None
        if on_update is not None:
            cb = lambda r: on_update(_result_from_doc(_doc_of(r, {}), []))  # noqa: E731
        w = watch_mod.Watcher(expand_path(directory), expand_path(output), opts, fmt=format,
                              until_step=until_step, poll=poll, on_update=cb)
        if stop is not None:
            w.stop_event = stop
        last = w.run()
        return None if last is None else _result_from_doc(_doc_of(last, {}), [])


def _series(series) -> list[tuple[float, list[str]]]:
    """``{sigma_rel: dir_or_glob_or_paths}`` or ``[(sigma_rel, ...), ...]`` ->
    the engine's ``[(gamma, paths), ...]``."""
    from ema_cli import schedule

    items = list(series.items()) if isinstance(series, Mapping) else list(series)
    out = []
    for item in items:
        try:
            s_rel, where = item
            g = schedule.sigma_rel_to_gamma(float(s_rel))
        except (TypeError, ValueError):
            raise UsageError(f"--from takes SIGMA_REL=DIR_OR_GLOB (got {item!r})") from None
        wheres = [where] if _is_pathlike(where) else list(where)
        paths: list[str] = []
        for w in wheres:
            w = expand_path(w)
            if not w:
                raise UsageError(f"--from takes SIGMA_REL=DIR_OR_GLOB (got {item!r})")
            local_glob = glob.has_magic(w) and "://" not in w and not os.path.lexists(w)  # URLs: resolved remotely
            found = sorted(glob.glob(w)) if local_glob else [w]
            if not found:
                raise EmaError("no checkpoints match", path=w)
            paths += found
        out.append((g, paths))
    if not out:
        raise UsageError("posthoc needs at least one snapshot series")
    return out


def _posthoc_targets(series, output: str, widths: list[str | None], *, gamma, at_step, **kw) -> list:
    from ema_cli import schedule

    parsed = _series(series)
    if len(widths) > 1 and gamma is not None:
        raise UsageError("give the targets with --sigma-rel or --gamma, not both")
    if len(widths) > 1 and "{sigma_rel}" not in output:
        raise UsageError("several --sigma-rel targets need '{sigma_rel}' in --output (e.g. -o 'ema-{sigma_rel}.safetensors')")
    if len(set(widths)) < len(widths):
        raise UsageError(f"--sigma-rel lists a width twice ({','.join(map(str, widths))})")
    targets = []
    for width in widths:
        try:
            s_rel = None if width is None else float(width)
        except ValueError:
            raise UsageError(f"--sigma-rel takes numbers separated by commas (got {width!r})") from None
        spec = schedule.Spec(sigma_rel=s_rel, gamma=gamma, at_step=at_step, posthoc_gammas=[])
        opts = _options(spec, series=parsed, **kw)
        targets.append((opts, output.replace("{sigma_rel}", width) if width is not None else output))
    return targets


def posthoc(
    series: Mapping[float, PathLike | Sequence[PathLike]] | Sequence[tuple[float, PathLike | Sequence[PathLike]]],
    output: PathLike,
    *,
    sigma_rel: float | Sequence[float] | None = None,
    gamma: float | None = None,
    at_step: int | None = None,
    dtype: str = "keep",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    format: str | None = None,
    allow_nonfinite: bool = False,
    saturate: bool = False,
    allow_copy_only: bool = False,
    state_key: str | None = None,
    skip_missing: bool = False,
    verify: bool = False,
    force: bool = False,
    threads: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> Result | list[Result]:
    """EDM2 post-hoc EMA: a power-function EMA of any width from snapshot series
    (what ``ema-avg posthoc`` does).

    Args:
        series: ``{sigma_rel: directory, glob or list of paths}`` of the power-EMA
            snapshots kept during training (or a list of such pairs).
        output: the output path; with several ``sigma_rel`` it must contain ``{sigma_rel}``.
        sigma_rel: the target width (< 0.2887), or a list of widths (written in one pass).
        gamma: the target exponent instead of ``sigma_rel``.
        at_step: reconstruct the EMA at this step (default: the latest snapshot).
        dtype, include, exclude, format, storage_options, ...: as for :func:`average`.

    Returns:
        A :class:`Result`, or a list of them when ``sigma_rel`` is a list.

    Raises:
        EmaError: bad snapshots or options; nothing is written then.
    """
    t0 = time.perf_counter()
    several = sigma_rel is not None and not isinstance(sigma_rel, (int, float, str))
    widths = [str(w) for w in sigma_rel] if several else [None if sigma_rel is None else str(sigma_rel)]
    with _library_call() as captured:
        targets = _posthoc_targets(series, expand_path(output), widths, gamma=gamma, at_step=at_step, dtype=dtype,
                                   include=include, exclude=exclude, allow_nonfinite=allow_nonfinite,
                                   threads=threads, allow_copy_only=allow_copy_only, saturate=saturate,
                                   state_key=state_key, skip_missing=skip_missing, storage_options=storage_options)
        results = _run([], targets, format, force=force, verify=verify, t0=t0)
        docs = [_doc_of(r, {}) for r in results]
    out = [_result_from_doc(d, list(captured)) for d in docs]
    _issue(out[0].warnings)
    return out if several else out[0]


def inspect(path: PathLike, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
            suffix: str = "ExponentialMovingAverage", state_key: str | None = None,
            storage_options: Mapping[str, Any] | None = None) -> list[TensorRow]:
    """The tensors of one checkpoint, in natural name order (``vars/2`` before
    ``vars/10``): what ``ema-avg inspect`` lists.

    Args:
        path: one checkpoint (file, TF prefix, sharded index, or a directory holding one).
        include, exclude: as for :func:`average` (they decide the ``averaged`` role).
        suffix: the shadow-name suffix (``x/SUFFIX`` is the shadow of ``x``).
        state_key: PyTorch: the key holding the state dict.
        storage_options: as for :func:`average`.

    Returns:
        One :class:`TensorRow` per tensor.

    Raises:
        EmaError: unreadable checkpoint, or a path naming several checkpoints.
    """
    from ema_cli import inspect as inspect_mod

    with _library_call():
        p = expand_path(path)
        docs = inspect_mod.inspect([p], include=list(include), exclude=list(exclude), suffix=suffix,
                                   options=_source_options(state_key, storage_options))
        if len(docs) != 1:
            raise UsageError(f"{p}: names {len(docs)} checkpoints; inspect takes one (e.g. {docs[-1]['path']})")
    return [TensorRow(r["name"], r["dtype"], tuple(r["shape"]), r["nbytes"], r["role"], r.get("kind", ""),
                      r.get("why", ""), r.get("shadow_of")) for r in docs[0]["tensors"]]


def restore_map(path: PathLike, *, suffix: str = "ExponentialMovingAverage", include: Sequence[str] = (),
                exclude: Sequence[str] = (), storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """TensorFlow's ``ema.variables_to_restore()`` for a checkpoint, as names.

    Args:
        path: one checkpoint.
        suffix: the EMA name (shadow of ``x`` is ``x/SUFFIX``).
        include, exclude: regular expressions adjusting the averaged set.
        storage_options: as for :func:`average`.

    Returns:
        ``{restore_name: variable_name}``.

    Raises:
        EmaError: unreadable checkpoint, bad suffix, several checkpoints.
    """
    from ema_cli import engine, maps, names

    with _library_call():
        names.check_suffix(suffix)
        pool = engine.ReaderPool()
        try:
            _src, r = maps.open_one(expand_path(path), pool, "restore-map", _source_options(None, storage_options))
            return dict(maps.restore_map(r, suffix, list(include), list(exclude)))
        finally:
            pool.close()


def restore_map_origin(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> tuple[str, str, str]:
    """(checkpoint path, format, where the averaged set came from): for the CLI's summary."""
    from ema_cli import engine, maps, names

    with _library_call():
        pool = engine.ReaderPool()
        try:
            src, r = maps.open_one(expand_path(path), pool, "restore-map", _source_options(None, storage_options))
            return src.path, src.format, maps.averaged_from(r)
        finally:
            pool.close()


def _check_rename_format(output: str, fmt: str) -> None:
    """rename keeps the input's format: refuse an output name that says another one."""
    from ema_cli import formats

    for name in formats.FORMAT_NAMES:
        if name == fmt:
            continue
        try:
            mod = formats.get(name)
        except ModuleNotFoundError:
            continue
        if mod.is_output(output) and not formats.get(fmt).is_output(output):
            raise UsageError(f"{output}: rename keeps the input's format ({fmt}); this name says {name}")


def rename(path: PathLike, output: PathLike, *, to: Literal["original", "shadow"],
           suffix: str = "ExponentialMovingAverage", include: Sequence[str] = (), exclude: Sequence[str] = (),
           max_shard_size: int | str | None = None, force: bool = False,
           storage_options: Mapping[str, Any] | None = None) -> RenameResult:
    """Rename a checkpoint's tensors between original and shadow names, keeping
    format and dtypes (what ``ema-avg rename`` does).

    Args:
        path: one checkpoint.
        output: the output path, in the input's format.
        to: ``"original"``: each ``x/SUFFIX`` written under ``x`` (shadows dropped:
            the offline ``swapping_saver``); ``"shadow"``: the averaged set renamed to ``x/SUFFIX``.
        suffix, include, exclude: as for :func:`restore_map`.
        max_shard_size: safetensors: HF shards of at most this size in the output directory.
        force: replace an existing output.
        storage_options: as for :func:`average` (for the input and the output).

    Returns:
        A :class:`RenameResult` (``as_dict()``: what ``rename --json`` prints).

    Raises:
        EmaError: unreadable checkpoint, bad options, an output name of another format.
    """
    from ema_cli import engine, maps, names

    t0 = time.perf_counter()
    if to not in ("original", "shadow"):
        raise UsageError("rename: to is 'original' or 'shadow'")
    direction = names.TO_ORIGINAL if to == "original" else names.TO_SHADOW
    with _library_call() as captured:
        out = expand_path(output)
        if isinstance(max_shard_size, str):
            max_shard_size = engine.parse_size(max_shard_size)
        pool = engine.ReaderPool()
        try:
            p = maps.rename_plan(expand_path(path), direction, suffix, include=list(include),
                                  exclude=list(exclude), max_shard_size=max_shard_size, pool=pool,
                                  storage_options=dict(storage_options or {}))
            src = p.checkpoints[0].source
            _check_rename_format(out, src.format)
            result = maps.run_rename(p, out, src.format, force=force, pool=pool,
                                      timings={"plan_s": time.perf_counter() - t0})
        finally:
            pool.close()
        result.timings["total_s"] = time.perf_counter() - t0
    info = p.rename
    from ema_cli.storage import absolute

    res = RenameResult(absolute(out), result.format, [absolute(f) for f in result.files],
                       absolute(src.path), direction, suffix, info["renamed"], info["dropped"], len(p.tasks),
                       list(info["rewritten"]), {t.name: t.out_name for t in p.tasks if t.name != t.out_name}, result.bytes_written,
                       dict(result.timings), list(captured) + list(p.warnings))
    _issue(res.warnings)
    return res


__all__ = [
    "CheckpointRow", "EmaError", "EmaWarning", "Inputs", "Plan", "Progress", "RenameResult", "Result", "Select",
    "TensorRow", "average", "expand_path", "inspect", "plan", "posthoc", "rename", "restore_map", "watch",
]
