"""The format registry: which module reads an input and which writes an output.

Format modules are imported here; none of them imports a heavy library
(TensorFlow) at import time.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ema_cli.errors import EmaError, UsageError
from ema_cli.formats.base import Format, Reader, Source, TensorInfo, Writer, counter_note

# name -> module path; order is the order in which formats are asked to claim a path
_MODULES = {
    "safetensors": "ema_cli.formats.safetensors_fmt",
    "tf": "ema_cli.formats.tf_fmt",
    "keras": "ema_cli.formats.keras_fmt",  # before hdf5: it claims the shard files of a .weights.json
    "hdf5": "ema_cli.formats.hdf5_fmt",
    "torch": "ema_cli.formats.torch_fmt",
}
FORMAT_NAMES = tuple(_MODULES)


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(_MODULES[name])
    except KeyError:
        raise EmaError(f"unknown format {name!r} (choose from {', '.join(_MODULES)})") from None


def _storage():
    from ema_cli import storage

    return storage


def get(name: str) -> Format:
    """The format called ``name`` (its module's ``FORMAT``)."""
    return module(name).FORMAT


def _available(names=None):
    """The formats, in claiming order, each module imported only when reached:
    a loop that stops at the first format claiming a path (a safetensors run)
    imports no other format module (start-up time)."""
    for name in _MODULES if names is None else [n for n in _MODULES if n in names]:
        yield get(name)


class Inputs(list):
    """The checkpoints ``resolve_inputs`` found (a list of ``Source``), and the
    warnings about what it left out (``warnings``: for ``plan.warnings``)."""

    def __init__(self, sources=(), warnings=()):
        super().__init__(sources)
        self.warnings: list[str] = list(warnings)


def resolve_inputs(args: list[str], options: tuple[tuple[str, str], ...] = ()) -> Inputs:
    """Turn command-line inputs (files, prefixes, directories) into checkpoints.

    Each checkpoint appears once, in the order first named, however many of its
    files were given (shards, ``.index``/``.data``/``.meta`` files).  A directory
    means the checkpoints in it, or those of its checkpoint sub-directories (see
    ``_scan_directory``); what was left out is in the result's ``warnings``.
    ``options`` (reader options such as ``state_key``) are attached to every source."""
    skip_missing = dict(options).get("skip_missing") == "1"  # --skip-missing: a state file's deleted checkpoints
    found: dict[str, Source] = {}
    warnings: list[str] = []
    expanded: list[str] = []
    for arg in args:
        if _storage().is_remote(arg):  # an fsspec URL: resolved in place, in order
            expanded.append(arg)
            continue
        arg = _storage().local_path(arg)
        if not os.path.lexists(arg) and glob.has_magic(arg):
            matches = sorted(glob.glob(arg))
            if not matches:
                raise EmaError("no checkpoints match this pattern", path=arg)
            expanded += matches
        else:
            expanded.append(arg)
    for arg in expanded:
        p = Path(arg)
        if _storage().is_remote(arg):
            from ema_cli.formats import remote

            sources = remote.resolve(arg, dict(options), warnings)
        elif p.is_dir():
            sources = _scan_directory(p, arg, warnings)
        else:
            sources = None
            for m in _available():
                sources = m.claim_path(p, skip_missing=skip_missing)
                if sources is not None:
                    break
            if sources is None:
                if not p.exists():
                    raise EmaError("no such file or directory", path=arg)
                raise EmaError(
                    "not a checkpoint ema-avg can read (expected .safetensors, "
                    "a TensorFlow checkpoint, HDF5 .h5/.hdf5, Keras .keras/.weights.json, or PyTorch .pt/.pth/.bin/.ckpt)",
                    path=arg,
                )
        for s in sources:
            if not s.step_note and not _storage().is_remote(s.path) and s.name_hint == Path(s.path).parent.name:
                note = counter_note(Path(s.path).parent)  # its step comes from its directory's name
                if note:
                    s = dataclasses.replace(s, step_note=note)
            found.setdefault(s.path, s)
    if not found:
        raise EmaError("no input checkpoints")
    if options:
        found = {k: dataclasses.replace(s, options=tuple(options)) for k, s in found.items()}
    return Inputs(found.values(), warnings)


#: the marker file ema-avg writes into every output directory
from ema_cli.output import MARKER as OUTPUT_MARKER  # noqa: E402


def _checkpoints_in(d: Path) -> list[Source]:
    """The checkpoints directly in directory ``d``, judged by its files.  A
    training framework's state files (the HF Trainer's ``optimizer.pt``,
    ``rng_state.pth``, ``training_args.bin``, ...) are never checkpoints to
    average, whatever format may one day claim their suffix."""
    from ema_cli.formats.base import is_training_state

    return [s for m in _available() for s in m.scan_dir(d) if not is_training_state(Path(s.path).name)]


def _scan_directory(p: Path, arg: str, warnings: list[str]) -> list[Source]:
    """A directory: the checkpoints directly in it, or those of its checkpoint
    sub-directories.

    A sub-directory is a checkpoint when it holds exactly one checkpoint (an HF
    Trainer ``checkpoint-500/`` with its shards, config, tokenizer and training
    state; ``step_1200/``, ``epoch_3/``, any name).  Hidden sub-directories
    (staging leftovers) and ema-avg's own output directories are not inputs;
    sub-directories with several checkpoints are left out with a warning.

    Both at once: with two or more checkpoint sub-directories and ONE
    checkpoint at the top (``trainer.save_model(out)`` beside
    ``out/checkpoint-*/``), the sub-directories are the run and the top-level
    checkpoint is left out with a warning (name it to include it).  Any other
    mix (several top-level checkpoints and checkpoint sub-directories, or one of
    each) is ambiguous: an error that says what to name instead."""
    top = _checkpoints_in(p)
    subs: list[Source] = []
    several: list[str] = []
    ours: list[str] = []
    for sub in sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith(".")):
        found = _checkpoints_in(sub)  # a broken index in a sub-directory is an error, not a skip
        if not found:
            continue
        if (sub / OUTPUT_MARKER).is_file():
            ours.append(str(sub))
            continue
        if len(found) == 1:
            s = found[0]
            subs.append(Source(s.format, s.path, s.files, name_hint=sub.name, step_note=counter_note(sub)))
        else:
            several.append(f"{sub} ({len(found)} checkpoints)")
    if ours:
        warnings.append(f"left out ema-avg output director{'y' if len(ours) == 1 else 'ies'} "
                        f"{_some(ours)} (name {'it' if len(ours) == 1 else 'them'} to include)")
    if not subs and not top:
        why = f" (sub-directories with several checkpoints each: {_some(several)}; name them)" if several else ""
        raise EmaError(f"no checkpoints in this directory{why}", path=arg)
    if several:
        warnings.append(f"left out sub-directories that hold several checkpoints: {_some(several)} (name them to include)")
    if not subs:
        return top
    if not top:
        return subs
    if len(top) == 1 and len(subs) >= 2:
        warnings.append(
            f"{top[0].path}: a checkpoint at the top of {arg} beside {len(subs)} checkpoint sub-directories "
            f"is left out (the final model of the run?); name it on the command line to include it")
        return subs
    raise EmaError(
        f"ambiguous directory: {len(top)} checkpoint(s) at its top ({_some([s.path for s in top])}) and "
        f"{len(subs)} checkpoint sub-director{'y' if len(subs) == 1 else 'ies'} "
        f"({_some([str(Path(s.path).parent) for s in subs])}); name the ones to average",
        path=arg,
    )


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def open_reader(source: Source) -> Reader:
    return get(source.format).reader(source)


def is_directory_output(path: str, fmt: str | None = None) -> bool:
    """``-o DIR/`` (a trailing slash), an existing directory, or a name with no
    suffix: the output is a directory in the inputs' format.  With ``--format
    tf`` a name without suffix is a checkpoint prefix (``avg/model``, ``ckpt-5``)."""
    if path.endswith("/") or path.endswith(os.sep) or os.path.isdir(path):
        return True
    return os.path.splitext(os.path.basename(path))[1] == "" and fmt != "tf"


def output_format(path: str, explicit: str | None, input_formats=()) -> str | None:
    """The output's format: ``--format``, else the suffix.  None for a directory
    output without ``--format``: it takes the inputs' format, which
    ``output_directory`` decides once the inputs are known (``engine.run``).
    A suffix two formats use (``.ckpt``: a TensorFlow prefix, a Lightning file)
    follows ``input_formats`` when they are all of the format that asks for it."""
    if explicit:
        module(explicit)
        return explicit
    if is_directory_output(path):
        return None
    for f in _available(set(input_formats)):  # a shared suffix goes to the inputs' format when it asks
        if f.is_output_given_inputs(path, input_formats):
            return f.name
    for f in _available():
        if f.is_output(path):
            return f.name
    raise EmaError(
        "cannot tell the output format from its name: use a .safetensors, .ckpt, "
        ".h5/.hdf5/.weights.h5, .keras, .weights.json or .pt/.pth/.bin suffix, a directory (DIR/) or --format",
        path=path,
    )


@dataclass(frozen=True)
class OutputDir:
    """A directory output: ``format`` and, inside ``directory``, the ``name`` the
    format's writer is given (``""``: the directory itself, for HF shards)."""

    directory: str
    format: str
    name: str


def output_directory(output: str, fmt: str | None, sources: list[Source], newest: Source, *,
                     shards: int, max_shard_size: int | None) -> OutputDir | None:
    """Whether ``output`` is a directory, and its layout; None for a file (or TF
    prefix) output.  A directory holds, per format: safetensors
    ``model.safetensors`` or HF shards + ``model.safetensors.index.json``
    (``--max-shard-size`` always means a directory); TensorFlow
    ``model.ckpt.*`` and the ``checkpoint`` state file; HDF5 ``model.h5`` (or
    ``model.weights.h5`` when the newest input is a ``.weights.h5``)."""
    if not (is_directory_output(output, fmt) or (fmt == "safetensors" and (max_shard_size or shards > 1))):
        return None
    if fmt is None:
        found = sorted({s.format for s in sources})
        if len(found) != 1:
            raise UsageError(f"{output}: the inputs are in several formats ({', '.join(found)}): "
                             "give --format for a directory output")
        fmt = found[0]
    name = get(fmt).directory_name(shards, newest)
    from ema_cli import storage

    directory = output.rstrip("/") if storage.is_remote(output) else os.path.abspath(output)
    return OutputDir(directory, fmt, name)


def directory_extras(out: OutputDir, newest: Source) -> tuple[list[str], list[str]]:
    """The files of the newest input's directory to copy into a directory output
    (a loader needs them beside the weights), and warnings about the files left
    out.  Only safetensors output from a safetensors input copies anything: the
    Hugging Face layout (config, tokenizer, remote code; never training state)."""
    directory = os.path.dirname(os.path.abspath(newest.path))
    copies, left_out = get(out.format).loader_files(directory, newest)
    warnings = []
    if left_out:
        warnings.append(f"not copied from {directory} into {out.directory}: {_some(left_out, 6)} "
                        "(not files a loader needs; copy them yourself if they are)")
    return copies, warnings


def copy_into(stage: str, copies: list[str], options: str) -> None:
    """Copy the loader files into a staged local directory output (``options``:
    the storage options of the store remote copies come from)."""
    import shutil

    from ema_cli import storage

    for f in copies:
        dst = os.path.join(stage, storage.basename(f))
        try:
            if storage.is_remote(f):
                storage.copy_file(f, dst, options)
            else:
                shutil.copyfile(f, dst)
        except OSError as e:
            raise EmaError(f"cannot copy into the output: {e.strerror}", path=f) from None


__all__ = [
    "FORMAT_NAMES", "OUTPUT_MARKER", "Format", "Inputs", "OutputDir", "Reader", "Source", "TensorInfo", "Writer",
    "copy_into", "directory_extras", "get", "is_directory_output", "module", "open_reader",
    "output_directory", "output_format", "resolve_inputs",
]
