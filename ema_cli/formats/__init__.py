"""The format registry: which module reads an input and which writes an output.

Format modules are imported here; none of them imports a heavy library
(TensorFlow) at import time.
"""

from __future__ import annotations

import glob
import importlib
import os
from pathlib import Path
from types import ModuleType

from ema_cli.errors import EmaError
from ema_cli.formats.base import Reader, Source, TensorInfo, Writer

# name -> module path; order is the order in which formats are asked to claim a path
_MODULES = {
    "safetensors": "ema_cli.formats.safetensors_fmt",
    "tf": "ema_cli.formats.tf_fmt",
    "hdf5": "ema_cli.formats.hdf5_fmt",
    "torch": "ema_cli.formats.torch_fmt",
}
FORMAT_NAMES = tuple(_MODULES)


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(_MODULES[name])
    except KeyError:
        raise EmaError(f"unknown format {name!r} (choose from {', '.join(_MODULES)})") from None


def _available() -> list[ModuleType]:
    mods = []
    for name in _MODULES:
        try:
            mods.append(module(name))
        except ModuleNotFoundError:  # a format whose module is not written yet
            continue
    return mods


def resolve_inputs(args: list[str]) -> list[Source]:
    """Turn command-line inputs (files, prefixes, directories) into checkpoints.

    Each checkpoint appears once, in the order first named, however many of its
    files were given (shards, ``.index``/``.data``/``.meta`` files)."""
    found: dict[str, Source] = {}
    expanded: list[str] = []
    for arg in args:
        if not os.path.lexists(arg) and glob.has_magic(arg):
            matches = sorted(glob.glob(arg))
            if not matches:
                raise EmaError("no checkpoints match this pattern", path=arg)
            expanded += matches
        else:
            expanded.append(arg)
    for arg in expanded:
        p = Path(arg)
        if p.is_dir():
            sources = [s for m in _available() for s in m.scan_dir(p)]
            if not sources:
                sources = _scan_subdirs(p)
            if not sources:
                raise EmaError("no checkpoints in this directory", path=arg)
        else:
            sources = None
            for m in _available():
                sources = m.claim_path(p)
                if sources is not None:
                    break
            if sources is None:
                if not p.exists():
                    raise EmaError("no such file or directory", path=arg)
                raise EmaError(
                    "not a checkpoint ema-avg can read (expected .safetensors, "
                    "a TensorFlow checkpoint, HDF5 .h5/.hdf5, or PyTorch .pt/.pth/.bin/.ckpt)",
                    path=arg,
                )
        for s in sources:
            found.setdefault(s.path, s)
    if not found:
        raise EmaError("no input checkpoints")
    return list(found.values())


def _scan_subdirs(p: Path) -> list[Source]:
    """A directory of checkpoint directories (``out/checkpoint-500/``, ...):
    each sub-directory holding exactly one checkpoint counts as one."""
    out = []
    for sub in sorted(q for q in p.iterdir() if q.is_dir()):
        found = [s for m in _available() for s in m.scan_dir(sub)]
        if len(found) == 1:
            s = found[0]
            out.append(Source(s.format, s.path, s.files, name_hint=sub.name))
    return out


def open_reader(source: Source) -> Reader:
    return module(source.format).Reader(source)


def output_format(path: str, explicit: str | None) -> str:
    if explicit:
        module(explicit)
        return explicit
    for m in _available():
        if m.is_output(path):
            return m.NAME
    raise EmaError(
        "cannot tell the output format from its name: use a .safetensors, .ckpt, "
        ".h5/.hdf5/.weights.h5 suffix or --format",
        path=path,
    )


__all__ = [
    "FORMAT_NAMES", "Reader", "Source", "TensorInfo", "Writer",
    "module", "open_reader", "output_format", "resolve_inputs",
]
