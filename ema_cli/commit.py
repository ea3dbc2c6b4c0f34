"""Outputs: where each is staged before the run, and its atomic commit after.

``prepare`` decides an output's layout (a file, a TF prefix, a directory, HF
shard files), refuses what must not be overwritten, stages it and returns
the ``OutputSpec`` tasks write to.  Nothing is at the output path until
``Prepared.commit``:

* local outputs are staged beside the target (``ema_cli.output``: a hidden
  file or directory, fsync'ed, then one rename; directories carry a marker of
  the files ema-avg wrote, and ``--force`` replaces exactly those);
* remote outputs (any fsspec URL) are uploaded under a hidden staging prefix
  beside the target (``.NAME.ema-avg-staging-XXXX/``); the commit copies them
  to their keys inside the object store (server-side copies: an object
  appears whole or not at all), the data first and the index last, and then
  deletes the staging prefix.  A failed run deletes its staging objects; the
  staging objects of a killed run are deleted by the next run writing the same
  output.  A remote directory output also carries the marker, so ``--force``
  replaces only what ema-avg wrote there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ema_cli import formats, storage
from ema_cli.errors import EmaError, UsageError
from ema_cli.execute import OutputSpec, ShardResult
from ema_cli.notices import warn
from ema_cli.output import MARKER, Staged, check_target, token
from ema_cli.planning import Plan
from ema_cli.readers import ReaderPool


@dataclass
class Prepared:
    """An output being written: its spec for the tasks, its staging, the rest
    the commit adds (loader files copied from the newest input, the shard
    index)."""

    output: str
    format: str
    spec: OutputSpec
    staged: object  # local: output.Staged / a format's staging; remote: RemoteStaging
    outdir: formats.OutputDir | None = None
    copies: list[str] = field(default_factory=list)
    # the storage options of the store the copies come from (the newest input's), for a local directory
    # output; a remote one copies with the output's options (it also writes there; one call's options)
    copies_options: str = ""
    shard_files: bool = False  # one task per output shard; the commit writes the index
    shard_infos: list = field(default_factory=list)
    final_files: list[str] = field(default_factory=list)

    @property
    def remote(self) -> bool:
        return isinstance(self.staged, RemoteStaging)

    @property
    def staged_path(self) -> str:
        """The staged output as a whole (what ``--verify`` reopens): a local
        path, or the URL of the staged object(s) under the staging prefix."""
        if self.outdir is not None:
            return self.staged.path
        if self.remote:
            return storage.join(self.staged.prefix_url, self.spec.name)
        return self.spec.write_path

    def finish(self, results: list[ShardResult], k: int = 0) -> None:
        """After every task: the shard index, and the loader files (``k``: this
        output's place in the tasks' outputs)."""
        fmt = formats.get(self.format)
        meta = dict(self.spec.metadata)
        if self.shard_files:
            done = {r.shard for r in results}
            missing = [i for i in range(len(self.shard_infos)) if i not in done]
            if missing:
                raise EmaError(f"internal: shard(s) {missing[:5]} reported no result", path=self.output)
            name, raw = fmt.index_document(self.shard_infos, meta)
            self._put(name, raw)
        if self.remote:
            for f in self.copies:
                storage.copy_file(f, storage.join(self.staged.prefix_url, storage.basename(f)),
                                  self.spec.storage_options)
                self.staged.files.append(storage.basename(f))
            for r in results:
                self.staged.files.extend(r.files[k])
        elif self.outdir is not None:
            formats.copy_into(self.staged.path, self.copies, self.copies_options)

    def _put(self, name: str, raw: bytes) -> None:
        if self.remote:
            self.staged.put(name, raw)
            return
        path = os.path.join(self.staged.path, name)
        try:
            with open(path, "wb") as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise EmaError(f"cannot write: {e.strerror}", path=os.path.join(self.outdir.directory, name)) from None

    def commit(self) -> None:
        self.staged.commit()
        self.final_files = list(self.staged.final_files) or [self.output]

    def discard(self) -> None:
        self.staged.discard()


def prepare(plan: Plan, output: str, out_format: str | None, *, force: bool, pool: ReaderPool,
            storage_options: str = "", split: bool = True) -> Prepared:
    """Stage ``output`` for ``plan``.  ``split``: an output with several shards
    in a format with shard files is written one task per shard."""
    newest = plan.checkpoints[plan.newest].source
    remote = storage.is_remote(output)
    outdir = _output_directory(plan, output, out_format, newest, remote, storage_options)
    if outdir is not None:
        out_format = outdir.format
    elif out_format is None:
        raise EmaError("internal: no output format", path=output)
    fmt = formats.get(out_format)
    _refuse_input_as_output(plan, output, directory=outdir is not None)
    copies: list[str] = []
    shard_files = fmt.shard_files and len(plan.shards) > 1 and outdir is not None and outdir.name == "" and split
    with pool.lease(newest) as template:
        metadata = dict(template.metadata())
    recipe = plan.describe()
    if recipe is not None:  # None (rename): the values are unchanged, so is the newest input's metadata
        metadata["ema_avg"] = json.dumps(recipe, separators=(",", ":"))
    meta = tuple(metadata.items())
    copies_options = dict(newest.options).get("storage_options", "")
    if outdir is not None:
        copies, notes = formats.directory_extras(outdir, newest)
        for note in notes:
            warn(note)
    if remote:
        staged = RemoteStaging(output if outdir is None else outdir.directory, is_dir=outdir is not None,
                               force=force, options=storage_options)
        spec = OutputSpec(out_format, "", outdir.name if outdir else storage.basename(output), outdir is not None,
                          meta, upload_to=staged.prefix_url, storage_options=storage_options,
                          upload_for=outdir.directory if outdir else storage.parent(output))
    elif outdir is not None:
        check_target(outdir.directory, force=force, is_dir=True)
        staged = Staged(outdir.directory, is_dir=True, force=force)
        spec = OutputSpec(out_format, staged.path, outdir.name, True, meta)
    else:
        staged = fmt.make_staging(output, sharded=len(plan.shards) > 1, force=force)
        spec = OutputSpec(out_format, staged.path, "", False, meta)
    return Prepared(output, out_format, spec, staged, outdir, copies, copies_options, shard_files,
                    plan.shard_infos() if shard_files else [])


def _output_directory(plan: Plan, output: str, out_format, newest, remote: bool, options: str):
    sources = [c.source for c in plan.checkpoints]
    kw = dict(shards=len(plan.shards), max_shard_size=plan.options.max_shard_size)
    if not remote:
        return formats.output_directory(output, out_format, sources, newest, **kw)
    is_dir = output.endswith("/") or os.path.splitext(storage.basename(output))[1] == "" and out_format != "tf"
    if not is_dir:
        fs, p = storage.filesystem(output, options)
        try:
            is_dir = fs.isdir(p)
        except EmaError:
            raise
        except Exception as e:  # noqa: BLE001 - the back-end's own errors too
            raise storage.remote_error(e, output) from None
    if not is_dir and not (out_format == "safetensors" and (kw["max_shard_size"] or kw["shards"] > 1)):
        return None
    return formats.output_directory(output.rstrip("/") + "/", out_format, sources, newest, **kw)


def _refuse_input_as_output(plan: Plan, output: str, *, directory: bool = False) -> None:
    """An output that is one of the inputs is refused; so is a directory output
    that contains an input at any depth (replacing it would delete the input)."""
    if storage.is_remote(output):
        out = output.rstrip("/")
        for c in plan.checkpoints:
            for f in (c.source.path, *c.source.files):
                if f.rstrip("/") == out or storage.parent(f) == out:
                    raise EmaError("output path is one of the inputs", path=output)
                if directory and f.startswith(out + "/"):
                    raise EmaError(f"output directory contains an input ({f}); choose another directory", path=output)
        return
    out = os.path.realpath(output)
    for c in plan.checkpoints:
        for f in (c.source.path, *c.source.files):
            if storage.is_remote(f):
                continue
            real = os.path.realpath(f)
            if real == out or os.path.realpath(os.path.dirname(f)) == out:
                raise EmaError("output path is one of the inputs", path=output)
            if directory and real.startswith(out.rstrip(os.sep) + os.sep):
                raise EmaError(f"output directory contains an input ({f}); choose another directory", path=output)


# --------------------------------------------------------------------------- remote outputs


STAGING_TAG = ".ema-avg-staging-"


class RemoteStaging:
    """A remote output staged under ``.NAME.ema-avg-staging-XXXX/`` beside it.

    The tasks upload their files there; ``commit`` copies them to the output's
    keys (data first, the index and the marker last) and deletes the prefix."""

    def __init__(self, final: str, *, is_dir: bool, force: bool, options: str = ""):
        self.final = final.rstrip("/")
        self.is_dir = is_dir
        self.force = force
        self.options = options
        self.fs, self.final_key = storage.filesystem(self.final, options)
        # (s3fs caches listings: what an earlier run of this process wrote must be seen)
        self.fs.invalidate_cache()
        self.final_key = self.final_key.rstrip("/")
        parent, base = self.final_key.rsplit("/", 1) if "/" in self.final_key else ("", self.final_key)
        self.parent, self.base = parent, base
        self.files: list[str] = []  # relative names, as the tasks and finish add them
        self.final_files: list[str] = []
        self.done = False
        self._old: set[str] = set()
        self._remove_stale()
        self._check_target()
        self.prefix = f"{parent}/.{base}{STAGING_TAG}{token()}" if parent else \
            f".{base}{STAGING_TAG}{token()}"
        self.prefix_url = storage.url(self.fs, self.prefix)
        self.path = self.prefix_url

    def _remove_stale(self) -> None:
        """Staging objects a killed run left behind for this output."""
        pattern = f"{self.parent}/.{self.base}{STAGING_TAG}*" if self.parent else f".{self.base}{STAGING_TAG}*"
        try:
            self.fs.invalidate_cache()
            stale = self.fs.glob(pattern)
        except FileNotFoundError:
            return
        except Exception as e:  # noqa: BLE001 - the first call to the store: its errors, in one line
            raise storage.remote_error(e, self.final, "cannot list") from None
        for path in stale:
            try:
                self.fs.rm(path, recursive=True)
            except (OSError, FileNotFoundError):
                pass

    def _check_target(self) -> None:
        fs, key = self.fs, self.final_key
        try:
            if not self.is_dir:
                if fs.exists(key):
                    if fs.isdir(key):
                        raise EmaError("output is a directory; expected a file path", path=self.final)
                    if not self.force:
                        raise EmaError("output exists (use --force to overwrite)", path=self.final)
                return
            if fs.isfile(key):
                raise EmaError("output exists and is not a directory (a directory output needs a directory path)",
                               path=self.final)
            present = [p[len(key) + 1:] for p in fs.find(key)] if fs.isdir(key) else []
        except EmaError:
            raise
        except Exception as e:  # noqa: BLE001 - the back-end's own errors too
            raise storage.remote_error(e, self.final) from None
        if not present:
            return
        listed = None
        if MARKER in present:
            try:
                doc = json.loads(fs.cat_file(f"{key}/{MARKER}"))
                listed = set(doc["files"]) if isinstance(doc.get("files"), list) else None
            except (OSError, ValueError, KeyError, TypeError):
                listed = None
        foreign = [p for p in present if listed is None or (p != MARKER and p not in listed)]
        if foreign:
            shown = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
            raise EmaError(f"output directory holds files ema-avg did not write ({shown}); ema-avg never deletes "
                           "them, even with --force: choose a new or empty directory", path=self.final)
        if not self.force:
            raise EmaError("output exists (use --force to overwrite)", path=self.final)
        self._old = set(present)

    def put(self, name: str, raw: bytes) -> None:
        try:
            self.fs.pipe_file(f"{self.prefix}/{name}", raw)
        except Exception as e:  # noqa: BLE001
            raise storage.remote_error(e, f"{self.final}/{name}", "cannot write") from None
        self.files.append(name)

    def commit(self) -> None:
        fs = self.fs
        files = list(dict.fromkeys(self.files))
        try:
            if not self.is_dir:  # one object (a TF prefix: its files beside each other), the index last
                beside = f"{self.parent}/" if self.parent else ""
                for f in [f for f in files if not _is_index(f)] + [f for f in files if _is_index(f)]:
                    fs.copy(f"{self.prefix}/{f}", beside + f)
                self.final_files = [storage.url(fs, beside + f) for f in files]
            else:
                # data first, then every index (a loader finds the index complete or not at all), the marker last
                data = [f for f in files if not _is_index(f)]
                for f in data + [f for f in files if _is_index(f)]:
                    fs.copy(f"{self.prefix}/{f}", f"{self.final_key}/{f}")
                marker = json.dumps({"tool": "ema-avg", "note": "files written by ema-avg; --force replaces "
                                     "exactly these", "files": sorted(files)}, indent=1) + "\n"
                fs.pipe_file(f"{self.final_key}/{MARKER}", marker.encode())
                for old in sorted(self._old - set(files) - {MARKER}):
                    fs.rm_file(f"{self.final_key}/{old}")
                self.final_files = [f"{self.final}/{f}" for f in sorted(files)]
        except Exception as e:  # noqa: BLE001
            raise storage.remote_error(e, self.final, "cannot commit the output") from None
        self.done = True
        self._delete_prefix()

    def _delete_prefix(self) -> None:
        try:
            self.fs.rm(self.prefix, recursive=True)
        except (OSError, FileNotFoundError):
            pass

    def discard(self) -> None:
        if not self.done:
            self._delete_prefix()


def _is_index(name: str) -> bool:
    return name.endswith(".index.json") or name.endswith(".index") or name == "checkpoint"
