"""``restore-map`` and ``rename``: TensorFlow's shadow names from the command line.

Registered by ``cli._register_optional_commands``.  Thin: parse, call
:mod:`ema_cli.names` / :mod:`ema_cli.engine`, render.
"""

import json
import os
import sys
from typing import Annotated, List, Optional

import typer

from ema_cli import api, interrupts, maps, names, render, storage
from ema_cli.cli_options import Force, Json, StorageOption, Suffix
from ema_cli.errors import EmaError, UsageError
from ema_cli import engine
from ema_cli.output import Staged, check_target

Ckpt = Annotated[str, typer.Argument(metavar="CHECKPOINT", help="One checkpoint: file, TF prefix, sharded index or directory holding one.",
                                     show_default=False)]
Include = Annotated[Optional[List[str]], typer.Option("--include", metavar="REGEX", help="Also count tensors matching REGEX as averaged (repeatable).")]
Exclude = Annotated[Optional[List[str]], typer.Option("--exclude", metavar="REGEX", help="Do not count tensors matching REGEX as averaged (repeatable).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No summary or warnings on stderr.")]


def _emit_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _summary(ui: render.UI, msg: str) -> None:
    """A one-line summary on stderr, like ``average``'s: only on a terminal, never with --quiet."""
    if ui.live:
        ui.console.print(msg, markup=False)


def restore_map(
    ckpt: Ckpt,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Write the map to this JSON file (default: stdout).")] = None,
    suffix: Suffix = names.DEFAULT_SUFFIX,
    include: Include = None, exclude: Exclude = None, storage_option: StorageOption = None,
    force: Force = False, quiet: Quiet = False, as_json: Json = False,
):
    """Print TensorFlow's ema.variables_to_restore() for a checkpoint, as names: {restore_name: variable_name}."""
    ui = render.UI(quiet=quiet)  # also silences library warnings with --quiet
    names.check_suffix(suffix)
    if as_json and output is None:
        raise UsageError("--json describes the map written with -o; without -o the map itself is printed")
    ckpt = api.expand_path(ckpt)
    output = api.expand_path(output) if output is not None else None
    pool = engine.ReaderPool()
    try:
        src, r = maps.open_one(ckpt, pool, "restore-map",
                               api._source_options(None, storage.parse_options(storage_option)))
        mapping = maps.restore_map(r, suffix, include or [], exclude or [])
        origin = maps.averaged_from(r)
    finally:
        pool.close()
    text = json.dumps(mapping, indent=2) + "\n"
    n_shadow = sum(1 for k, v in mapping.items() if k != v)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    if storage.is_remote(output):
        storage.write_object(output, text.encode(), force=force, options=storage.parse_options(storage_option))
    else:
        _write_text(output, text, force=force)
    if as_json:
        _emit_json({"output": storage.absolute(output), "checkpoint": storage.absolute(src.path), "format": src.format, "suffix": suffix,
                    "averaged_from": origin, "entries": len(mapping), "from_shadow": n_shadow})
    _summary(ui, f"wrote {output}: {len(mapping)} entries, {n_shadow} restored from */{suffix} "
                 f"(averaged set from {origin})")


def _write_text(path: str, text: str, *, force: bool) -> None:
    """Atomic, like every output: staged beside the target, fsync'ed, renamed."""
    if os.path.isdir(path):
        raise EmaError("output is a directory; expected a file path", path=path)
    check_target(path, force=force, is_dir=False)
    staged = Staged(path, is_dir=False, force=force)
    try:
        with open(staged.path, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        with interrupts.committing():
            staged.commit()
    except OSError as e:
        staged.discard()
        raise EmaError(f"cannot write: {e.strerror}", path=path) from None
    except BaseException:
        staged.discard()
        raise


def rename(
    ckpt: Ckpt,
    output: Annotated[str, typer.Option("--output", "-o", metavar="OUT", help="Output path, in the input's format.", show_default=False)],
    to_original: Annotated[bool, typer.Option("--to-original", help="Write each x/SUFFIX under x and drop the shadow names (offline swapping_saver).")] = False,
    to_shadow: Annotated[bool, typer.Option("--to-shadow", help="Rename the averaged set x to x/SUFFIX; other tensors unchanged.")] = False,
    suffix: Suffix = names.DEFAULT_SUFFIX,
    include: Include = None, exclude: Exclude = None, storage_option: StorageOption = None,
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size", metavar="SIZE", help="safetensors: write HF-style shards of at most SIZE into the OUTPUT directory.")] = None,
    force: Force = False, quiet: Quiet = False, as_json: Json = False,
):
    """Rename a checkpoint's tensors between original and shadow names, keeping format and dtypes."""
    ui = render.UI(quiet=quiet)  # also silences library warnings with --quiet
    if to_original == to_shadow:
        raise UsageError("give exactly one of --to-original and --to-shadow")
    res = api.rename(ckpt, output, to="original" if to_original else "shadow", suffix=suffix,
                     include=include or [], exclude=exclude or [], max_shard_size=max_shard_size or None, force=force,
                     storage_options=storage.parse_options(storage_option))
    ui.warnings(res.warnings)
    if as_json:
        _emit_json(res.as_dict())
    info = {"renamed": res.renamed, "dropped": res.dropped}
    direction = res.direction
    what = (f"{info['renamed']} */{suffix} written under the original names, {info['dropped']} replaced"
            if direction == names.TO_ORIGINAL else f"{info['renamed']} tensor(s) renamed to */{suffix}")
    _summary(ui, f"wrote {res.output} ({res.format}, {render.human_bytes(res.bytes_written)}): {what}, "
                 f"{res.tensors - info['renamed']} unchanged")


def register(app: typer.Typer) -> None:
    app.command("restore-map", help="TensorFlow's ema.variables_to_restore() for a checkpoint, offline: "
                "{restore_name: variable_name} as JSON.")(restore_map)
    app.command("rename", help="Write a checkpoint with shadow values under the original names (--to-original, "
                "the offline swapping_saver) or the averaged set under shadow names (--to-shadow).")(rename)
