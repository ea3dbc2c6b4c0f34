"""Remote inputs: checkpoints named by fsspec URLs (``s3://``, ``gs://``, ...).

Formats that read remote objects themselves (``Format.remote_reads``:
safetensors, single files and HF shards) get Sources that carry the URLs;
their readers fetch only the byte ranges a task needs (the header first).
The other formats' libraries need local files (TensorFlow bundles with their
``.meta``, HDF5, ``torch.load``): such checkpoints are first copied into a
local temporary directory (removed when the process exits), with a note on
stderr and in ``--json`` (``copied``), and read from there.  Globs are
expanded by the filesystem.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import glob
import os
import shutil
import sys
import tempfile

from ema_cli import storage
from ema_cli.errors import EmaError
from ema_cli.formats.base import Source
from ema_cli.notices import warn

#: what this process copied to local files: {"from": URL, "to": path, "bytes": n}
copied: list[dict] = []
_tmp: list[str] = []


def resolve(arg: str, options: dict, warnings: list[str]) -> list[Source]:
    so = options.get("storage_options", "")
    fs, key = storage.filesystem(arg, so)
    try:
        keys = sorted(fs.glob(key)) if glob.has_magic(key) else [key.rstrip("/")]
        if glob.has_magic(key) and not keys:
            raise EmaError("no checkpoints match this pattern", path=arg)
        out: list[Source] = []
        for k in keys:
            if fs.isdir(k):
                out += _directory(fs, k, warnings, so)
            else:
                out += _object(fs, k, so)
    except EmaError:
        raise
    except Exception as e:  # noqa: BLE001 - the back-end's own errors (botocore, gcsfs, ...): one line
        raise storage.remote_error(e, arg) from None
    return out


def _remote_formats():
    from ema_cli import formats

    return [f for f in formats._available() if f.remote_reads]


def _object(fs, key: str, so: str) -> list[Source]:
    for f in _remote_formats():
        found = f.claim_url(fs, key)
        if found is not None:
            return found
    # a format read from local files: the object, or a TF prefix's files
    stem = key[:-len(".index")] if key.endswith(".index") else key
    parent = key.rsplit("/", 1)[0] if "/" in key else ""
    names = set(fs.glob(glob.escape(stem) + ".*")) | ({key} if fs.isfile(key) else set())
    if not names:
        raise EmaError("no such file or object", path=storage.url(fs, key))
    state = f"{parent}/checkpoint"
    if any(n.endswith(".index") for n in names) and fs.isfile(state):
        names.add(state)
    local = _download(fs, sorted(names), parent)
    from ema_cli import formats

    target = os.path.join(local, stem.rsplit("/", 1)[-1] if stem != key or not fs.isfile(key) else key.rsplit("/", 1)[-1])
    if key.endswith(".index"):
        target = os.path.join(local, key.rsplit("/", 1)[-1])
    return list(formats.resolve_inputs([target]))


def _directory(fs, key: str, warnings: list[str], so: str) -> list[Source]:
    from ema_cli.output import MARKER

    top = [s for f in _remote_formats() for s in f.scan_url_dir(fs, key)]
    subs: list[Source] = []
    for entry in sorted(fs.ls(key, detail=True), key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or name.startswith("."):
            continue
        sub = entry["name"].rstrip("/")
        if fs.isfile(f"{sub}/{MARKER}"):
            warnings.append(f"left out ema-avg output directory {storage.url(fs, sub)} (name it to include)")
            continue
        found = [s for f in _remote_formats() for s in f.scan_url_dir(fs, sub)]
        if len(found) == 1:
            subs.append(dataclasses.replace(found[0], name_hint=name))
        elif found:
            warnings.append(f"left out {storage.url(fs, sub)}: it holds {len(found)} checkpoints (name them)")
    if subs and top:
        if len(top) == 1 and len(subs) >= 2:
            warnings.append(f"{top[0].path}: a checkpoint at the top of {storage.url(fs, key)} beside {len(subs)} "
                            "checkpoint sub-directories is left out (the final model of the run?); name it to include it")
            return subs
        raise EmaError(f"ambiguous directory: {len(top)} checkpoint(s) at its top and {len(subs)} checkpoint "
                       "sub-directories; name the ones to average", path=storage.url(fs, key))
    if subs or top:
        return subs or top
    # no checkpoint read remotely: a directory of another format, read from a local copy
    names = [n for n in fs.find(key) if not n[len(key):].lstrip("/").startswith(".")]
    if not names:
        raise EmaError("no checkpoints in this directory", path=storage.url(fs, key))
    parent = key.rsplit("/", 1)[0] if "/" in key else ""
    local = _download(fs, names, parent)
    from ema_cli import formats

    return list(formats.resolve_inputs([os.path.join(local, key.rsplit("/", 1)[-1])]))


def _download(fs, keys: list[str], parent: str) -> str:
    """Copy objects into a new local temporary directory, keeping their paths
    below ``parent``; the directory is removed when the process exits."""
    tmp = tempfile.mkdtemp(prefix="ema-avg-remote-")
    if not _tmp:
        atexit.register(_cleanup)
    _tmp.append(tmp)
    total = 0
    sizes = {}
    for k in keys:
        try:
            sizes[k] = int(fs.size(k) or 0)
        except OSError:
            sizes[k] = 0
        total += sizes[k]
    warn(f"copying {len(keys)} file(s) ({total / 1e6:.1f} MB) from {storage.url(fs, parent or keys[0])} to a local "
         f"temporary directory: this format is read from local files")
    with _progress(total) as advance:
        for k in keys:
            rel = k[len(parent):].lstrip("/") if parent and k.startswith(parent + "/") else k.rsplit("/", 1)[-1]
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                with fs.open(k, "rb") as src, open(dst, "wb") as out:
                    while True:
                        chunk = src.read(8 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
                        advance(len(chunk))
            except Exception as e:  # noqa: BLE001 - the back-end's own errors too
                raise storage.remote_error(e, storage.url(fs, k), "cannot copy") from None
            copied.append({"from": storage.url(fs, k), "to": dst, "bytes": sizes[k]})
    return tmp


@contextlib.contextmanager
def _progress(total: int):
    """A progress bar on stderr while copying, when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("copying"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=Console(stderr=True), transient=True) as prog:
        tid = prog.add_task("copying", total=total)
        yield lambda n: prog.update(tid, advance=n)


def _cleanup() -> None:
    for t in _tmp:
        shutil.rmtree(t, ignore_errors=True)
