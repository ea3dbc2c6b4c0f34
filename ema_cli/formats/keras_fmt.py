"""Keras 3 archives (``.keras``) and Keras sharded weights (``.weights.json``).

**``.keras``** (``model.save("x.keras")``) is a zip holding ``metadata.json``,
``config.json`` and ``model.weights.h5`` (and ``assets/...`` for layers that
have assets), in that order.  Keras writes it with ``zipfile.ZipFile(f, "w")``,
whose default is ``ZIP_STORED``: the weights file is stored uncompressed, so it
is a contiguous byte range of the zip.  It is read in place: HDF5 reads it
through a file object restricted to that range, contiguous datasets are mapped
straight from the zip, and the HDF5 reader's checks (no links, no external or
virtual data, global heaps parsed first) apply as to any HDF5 file.  Nothing is
extracted.  A member someone re-zipped with compression (deflate) has no bytes
in place: it is read through zipfile's decompressing reader instead (HDF5
seeks, so this is slower; still nothing is written to disk).  Tensors are
named as in the weights file (``layers/dense/vars/0``), so a ``.keras`` and a
``.weights.h5`` of the same model agree; ``config.json`` gives each layer's
class (roles: BatchNormalization statistics).

Output ``-o avg.keras``: ``metadata.json``, ``config.json`` and every other
member of the newest input, verbatim and in its order, with the averaged
``model.weights.h5`` (written like any HDF5 output from the newest input's
weights file, then stored in the zip).

**Sharded weights** (``model.save_weights("x.weights.json",
max_shard_size=GB)``, Keras >= 3.10): ``x.weights.json`` (``{"metadata":
{"total_size"}, "weight_map": {"/layers/dense/vars": ["x_00000.weights.h5",
...]}}``) and ``x_00000.weights.h5``, ``x_00001.weights.h5``, ... (from 00000);
a layer's variables may span shards.  The index or any shard names the one
checkpoint; tensor names are those of an unsharded file.  Output ``-o
avg.weights.json``: the newest input's shard layout when it is sharded (each
shard written from its template shard), else ``--max-shard-size`` packing,
else one shard; the index is moved into place last.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ema_cli.errors import EmaError, UsageError
from ema_cli.formats import base, hdf5_fmt
from ema_cli.formats.base import Role, Source, TensorInfo
from ema_cli.output import Staged, _fsync_dir, check_target, fsync_file, shown_path

NAME = "keras"
ARCHIVE_SUFFIX = ".keras"
INDEX_SUFFIX = ".weights.json"
WEIGHTS = "model.weights.h5"  # saving_lib._VARS_FNAME_H5
CONFIG = "config.json"
METADATA = "metadata.json"
_SHARD_RE = re.compile(r"^(?P<base>.+)_(?P<idx>\d{5})\.weights\.h5$")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header (30 bytes)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error, NotImplementedError,
               OverflowError, UnicodeDecodeError, KeyError, RuntimeError, zlib.error)  # RuntimeError: encrypted


# --------------------------------------------------------------------------- discovery


def is_output(path: str) -> bool:
    p = path.lower()
    return p.endswith(ARCHIVE_SUFFIX) or p.endswith(INDEX_SUFFIX)


def claim_path(path: Path, *, skip_missing: bool = False) -> list[Source] | None:
    path = Path(path)
    if not path.is_file():
        return None
    name = path.name
    if name.lower().endswith(ARCHIVE_SUFFIX):
        return [Source(NAME, str(path), (str(path),), name_hint=name)]
    if name.endswith(INDEX_SUFFIX):
        return [_sharded_source(path)]
    index = shard_index(path)
    return [_sharded_source(index)] if index is not None else None


def scan_dir(path: Path) -> list[Source]:
    out: list[Source] = []
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and (f.name.lower().endswith(ARCHIVE_SUFFIX) or f.name.endswith(INDEX_SUFFIX)):
            out.extend(claim_path(f) or [])
    return out


def shard_index(path: Path) -> Path | None:
    """The ``<base>.weights.json`` beside a ``<base>_NNNNN.weights.h5`` that lists it."""
    m = _SHARD_RE.match(Path(path).name)
    if not m:
        return None
    index = Path(path).with_name(m.group("base") + INDEX_SUFFIX)
    if not index.is_file():
        return None
    try:
        files = _index_files(index, _load_index(index))
    except EmaError:
        return None  # not our index: the shard is read as a file of its own
    return index if Path(path).name in {Path(f).name for f in files} else None


def _load_index(index: Path) -> dict:
    try:
        doc = json.loads(Path(index).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EmaError(f"not a readable Keras sharded-weights index: {hdf5_fmt._msg(e)}", path=str(index)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise EmaError("Keras sharded-weights index has no 'weight_map' object", path=str(index))
    for k, v in doc["weight_map"].items():
        files = v if isinstance(v, list) else [v]
        if not files or not all(isinstance(f, str) and f.endswith(".h5") and "/" not in f and "\\" not in f
                                and f not in (".", "..") for f in files):
            raise EmaError(f"index maps {k!r} to an invalid shard file name {v!r}", path=str(index))
    return doc


def _index_files(index: Path, doc: dict) -> list[str]:
    names: dict[str, None] = {}
    for v in doc["weight_map"].values():
        for f in v if isinstance(v, list) else [v]:
            names[f] = None
    return [str(Path(index).parent / f) for f in sorted(names)]


def _sharded_source(index: Path) -> Source:
    files = _index_files(index, _load_index(index))
    for f in files:
        if not os.path.isfile(f):
            raise EmaError(f"shard {os.path.basename(f)} listed in the index is missing", path=str(index))
    return Source(NAME, str(index), (str(index), *files), name_hint=index.name)


# --------------------------------------------------------------------------- reading


class _Archive:
    """A ``.keras`` zip: its members, and where ``model.weights.h5`` is."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path, "r")
        except _ZIP_ERRORS as e:  # zipfile raises more than BadZipFile on a corrupt directory
            raise EmaError(f"not a .keras archive (a zip file): {hdf5_fmt._msg(e)}", path=path) from None
        except OSError as e:
            raise EmaError(f"cannot open: {e.strerror}", path=path) from None
        try:
            self.members = self.zip.infolist()
            names = [i.filename for i in self.members]
            if WEIGHTS not in names:
                extra = " (weights saved as model.weights.npz are not supported)" if "model.weights.npz" in names else ""
                raise EmaError(f"a .keras archive without {WEIGHTS}{extra}", path=path)
            if CONFIG not in names:
                raise EmaError(f"a .keras archive without {CONFIG}", path=path)
            self.weights = self.zip.getinfo(WEIGHTS)
            if self.weights.flag_bits & 0x1:
                raise EmaError(f"{WEIGHTS} is encrypted", path=path)
            self.config_bytes = self._read_small(CONFIG)
            try:
                self.config = json.loads(self.config_bytes)
            except ValueError as e:
                raise EmaError(f"{CONFIG} is not JSON: {hdf5_fmt._msg(e)}", path=path) from None
            try:
                self.image = self._image()
            except (OSError, ValueError, OverflowError) as e:
                raise EmaError(f"corrupt zip: cannot locate {WEIGHTS}: {hdf5_fmt._msg(e)}", path=path) from None
        except BaseException:
            self.zip.close()
            raise

    def _read_small(self, name: str) -> bytes:
        info = self.zip.getinfo(name)
        if info.file_size > 256 << 20:
            raise EmaError(f"{name} is {info.file_size} bytes: not a Keras {name}", path=self.path)
        try:
            return self.zip.read(name)
        except (*_ZIP_ERRORS, OSError) as e:
            raise EmaError(f"cannot read {name}: {hdf5_fmt._msg(e)}", path=self.path) from None

    def _image(self) -> hdf5_fmt.Image:
        info = self.weights
        fsize = os.path.getsize(self.path)
        if info.compress_type != zipfile.ZIP_STORED:
            # no bytes in place: HDF5 reads through zipfile's decompressing reader
            # (seekable; a backwards seek restarts decompression, so this is slow,
            # but nothing is extracted to disk and the reader's checks still apply)
            try:
                self.zip.open(info).close()  # an unknown method or a bad local header: refused here
            except (*_ZIP_ERRORS, OSError) as e:
                raise EmaError(f"cannot read {WEIGHTS}: {hdf5_fmt._msg(e)}", path=self.path) from None
            return hdf5_fmt.Image(self.path, None, info.file_size, stream=lambda: _Stream(self.zip.open(info)))
        with open(self.path, "rb") as fh:
            fh.seek(info.header_offset)
            head = fh.read(_LOCAL_HEADER.size)
        if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            raise EmaError(f"corrupt zip: no local header for {WEIGHTS}", path=self.path)
        fields = _LOCAL_HEADER.unpack(head)
        start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        if info.compress_size != info.file_size or start + info.file_size > fsize:
            raise EmaError(f"truncated: {WEIGHTS} needs bytes {start}..{start + info.file_size} "
                           f"of a {fsize}-byte file", path=self.path)
        return hdf5_fmt.Image(self.path, start, info.file_size)

    def close(self) -> None:
        self.zip.close()


class _Stream(io.RawIOBase):
    """zipfile's reader of a compressed member, whose failures (bad CRC, corrupt
    deflate data, a short member) are OSErrors: what the HDF5 reader (and h5py's
    file-object driver, calling back into it) reports as a read error."""

    def __init__(self, member):
        super().__init__()
        self._m = member

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except _ZIP_ERRORS as e:
            raise OSError(f"{WEIGHTS}: {hdf5_fmt._msg(e)}") from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._guard(self._m.seek, pos, whence)

    def tell(self) -> int:
        return self._m.tell()

    def readinto(self, b) -> int:
        data = self._guard(self._m.read, len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._m.close()
        finally:
            super().close()


class ArchiveReader(hdf5_fmt.Hdf5Reader):
    """A ``.keras``: its ``model.weights.h5``, read in place."""

    format = NAME

    def __init__(self, source: Source):
        self.archive = _Archive(source.path)
        try:
            super().__init__(source, image=self.archive.image)
        except BaseException:
            self.archive.close()
            raise
        self.set_model_config(self.archive.config)

    def extras(self):
        out = super().extras()
        img = self.archive.image
        out.update({"layout": "keras-archive", "members": [i.filename for i in self.archive.members],
                    "weights_in_place": img.base is not None})
        return out

    def close(self) -> None:
        super().close()
        self.archive.close()


class ShardedReader(base.Reader):
    """Keras sharded weights: one checkpoint over its shard files."""

    format = NAME

    def __init__(self, source: Source):
        super().__init__(source)
        self.index = _load_index(Path(source.path))
        self.shards: list[hdf5_fmt.Hdf5Reader] = []
        self._where: dict[str, int] = {}
        self._tensors: dict[str, TensorInfo] = {}
        try:
            for f in source.files[1:]:
                if not hdf5_fmt.is_hdf5(Path(f)):
                    raise EmaError("not an HDF5 file (no HDF5 signature)", path=f)
                r = hdf5_fmt.Hdf5Reader(Source(hdf5_fmt.NAME, f, (f,)))
                self.shards.append(r)
                for name, info in r.tensors().items():
                    if name in self._where:
                        other = self.shards[self._where[name]].path
                        raise EmaError(f"also in {other}: a tensor is in one shard only", path=f, tensor=name)
                    self._where[name] = len(self.shards) - 1
                    self._tensors[name] = info
        except BaseException:
            self.close()
            raise

    def shard_of(self, name: str) -> int:
        return self._where[name]

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def read(self, name: str) -> np.ndarray:
        return self.shards[self._where[name]].read(name)

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """Done with (part of) a tensor: its shard drops the mapped pages (``Hdf5Reader.release``)."""
        self.shards[self._where[name]].release(name, first, last)

    def role(self, info: TensorInfo) -> Role:
        return self.shards[self._where[info.name]].role(info)

    def step(self) -> int | None:
        for r in self.shards:
            s = r.step()
            if s is not None:
                return s
        return None

    def metadata(self) -> dict[str, str]:
        return self.shards[0].metadata() if self.shards else {}

    def extras(self):
        not_tensors = {}
        for r in self.shards:
            not_tensors.update(r.not_tensors)
        return {"layout": "keras3-sharded-weights", "shards": [r.path for r in self.shards],
                "not_tensors": not_tensors}

    def close(self) -> None:
        for r in self.shards:
            r.close()


def Reader(source: Source):  # noqa: N802 - the format API's name
    if source.path.lower().endswith(ARCHIVE_SUFFIX):
        return ArchiveReader(source)
    return ShardedReader(source)


# --------------------------------------------------------------------------- staging


def make_staging(output: str, *, sharded: bool, force: bool):
    low = output.lower()
    if low.endswith(ARCHIVE_SUFFIX):
        if sharded:
            raise UsageError("a .keras output is one archive: --max-shard-size applies to safetensors "
                             "output or Keras sharded weights (-o NAME.weights.json)")
        return ArchiveStaging(output, force=force)
    if output.endswith(INDEX_SUFFIX):
        return ShardStaging(output, force=force)
    raise UsageError(f"--format keras writes a .keras archive or sharded weights (NAME{INDEX_SUFFIX}): {output}")


def _move(src: str, dst: str, force: bool) -> None:
    if force:
        os.replace(src, dst)
    else:  # never replaces a file that appeared meanwhile (a concurrent run)
        os.link(src, dst)
        os.unlink(src)


class _DirStaging:
    """Files staged in a hidden directory beside the target (``output.Staged``,
    so a killed run's leftovers are removed by the next run)."""

    def __init__(self, output: str, *, force: bool):
        self.final = os.path.abspath(output)
        self.force = force
        self._staged = Staged(self.final, is_dir=True)
        self.final_files: list[str] = []
        self.done = False

    def commit(self) -> None:
        try:
            self._commit()
        except FileExistsError as e:
            raise EmaError("output appeared while writing it (use --force to overwrite)",
                           path=e.filename or self.final) from None
        except OSError as e:
            raise EmaError(f"cannot move the output into place: {e.strerror}", path=e.filename or self.final) from None
        self.done = True
        shutil.rmtree(self._staged.path, ignore_errors=True)

    def discard(self) -> None:
        if not self.done:
            self._staged.discard()


class ArchiveStaging(_DirStaging):
    """The writer builds ``model.weights.h5`` at ``path``, then the zip at
    ``archive`` (both in the staging directory); the zip is moved into place."""

    def __init__(self, output: str, *, force: bool):
        check_target(output, force=force, is_dir=False)
        super().__init__(output, force=force)
        self.path = os.path.join(self._staged.path, WEIGHTS)
        self.archive = os.path.join(self._staged.path, "archive" + ARCHIVE_SUFFIX)

    def _commit(self) -> None:
        fsync_file(self.archive)
        _move(self.archive, self.final, self.force)
        _fsync_dir(os.path.dirname(self.final))
        self.final_files = [self.final]


def _out_base(index_path: str) -> str:
    return os.path.basename(index_path)[: -len(INDEX_SUFFIX)]


class ShardStaging(_DirStaging):
    """Shards and index staged together; on commit the shards are moved first
    and the index last (a reader never sees an index without its shards); shards
    of a replaced output that the new one does not have are removed."""

    def __init__(self, output: str, *, force: bool):
        final = os.path.abspath(output)
        check_target(final, force=force, is_dir=False)
        parent, base = os.path.dirname(final), _out_base(final)
        old = sorted(str(p) for p in Path(parent).glob(f"{glob.escape(base)}_[0-9][0-9][0-9][0-9][0-9].weights.h5"))
        if old and not force:
            raise EmaError("output exists (use --force to overwrite)", path=old[0])
        self._stale = old
        super().__init__(output, force=force)
        self.path = os.path.join(self._staged.path, os.path.basename(final))

    def _commit(self) -> None:
        d = self._staged.path
        parent = os.path.dirname(self.final)
        index = os.path.basename(self.final)
        names = sorted(f for f in os.listdir(d) if f != index)
        if index not in os.listdir(d):
            raise EmaError("internal: the writer wrote no index", path=self.final)
        moved = []
        for f in names + [index]:
            fsync_file(os.path.join(d, f))
        for f in names + [index]:
            dst = os.path.join(parent, f)
            _move(os.path.join(d, f), dst, self.force)
            moved.append(dst)
        for f in self._stale:
            if f not in moved:
                try:
                    os.unlink(f)
                except OSError:
                    pass
        _fsync_dir(parent)
        self.final_files = moved


# --------------------------------------------------------------------------- writing


class KerasWriter(base.Writer):
    """``model.weights.h5`` inside a ``.keras``, or Keras sharded weights."""

    writes_ranges = True

    def __init__(self, path: str, shards: list[list[TensorInfo]], metadata: dict[str, str], template=None):
        self.path = path
        self._writers: list[hdf5_fmt.Hdf5Writer] = []
        self._route: dict[str, hdf5_fmt.Hdf5Writer] = {}
        self._template = template
        if path.endswith(INDEX_SUFFIX):
            self.shown = os.path.join(os.path.dirname(os.path.dirname(path)), os.path.basename(path))
            self._archive = False
            self._start_shards(shards, metadata, template)
        else:
            self.shown = shown_path(os.path.dirname(path))
            self._archive = True
            if not isinstance(template, ArchiveReader):
                what = template.path if template is not None else "the input"
                raise EmaError(f"a .keras output takes {CONFIG} and {METADATA} from the newest input, and {what} "
                               "is not a .keras archive (write NAME.weights.h5 instead)", path=self.shown)
            w = hdf5_fmt.Hdf5Writer(path, shards, metadata, template=template, shown=self.shown)
            self._writers = [w]
            for shard in shards:
                for info in shard:
                    self._route[info.name] = w

    # ------------------------------------------------------------- sharded

    def _start_shards(self, shards, metadata, template) -> None:
        d, base = os.path.dirname(self.path), _out_base(self.path)
        infos = [i for s in shards for i in s]
        groups: list[tuple[list[TensorInfo], object]] = []
        if len(shards) <= 1 and isinstance(template, ShardedReader) and all(i.name in template.tensors() for i in infos):
            per = [[] for _ in template.shards]
            for i in infos:
                per[template.shard_of(i.name)].append(i)
            groups = [(p, template.shards[k]) for k, p in enumerate(per)]
        elif len(shards) <= 1 and isinstance(template, hdf5_fmt.Hdf5Reader):
            groups = [(infos, template)]
        else:
            groups = [(list(s), None) for s in shards] or [([], None)]
        weight_map: dict[str, list[str]] = {}
        self._total = 0
        try:
            for k, (group, tmpl) in enumerate(groups):
                fname = f"{base}_{k:05d}.weights.h5"
                w = hdf5_fmt.Hdf5Writer(os.path.join(d, fname), [group], metadata, template=tmpl,
                                        shown=os.path.join(os.path.dirname(self.shown), fname))
                self._writers.append(w)
                for i in group:
                    self._route[i.name] = w
                    key = "/" + i.name.rpartition("/")[0]
                    files = weight_map.setdefault(key, [])
                    if fname not in files:
                        files.append(fname)
                    self._total += i.nbytes
        except BaseException:
            self.abort()
            raise
        self._weight_map = weight_map

    # ------------------------------------------------------------- streaming

    def write(self, name: str, array: np.ndarray) -> None:
        self._route[name].write(name, array)

    def write_range(self, name: str, start: int, flat: np.ndarray) -> None:
        """Part of a tensor (``Hdf5Writer.write_range``): large tensors stream."""
        self._route[name].write_range(name, start, flat)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        try:
            if self._archive:
                self._zip()
            else:
                doc = {"metadata": {"total_size": float(self._total)}, "weight_map": self._weight_map}
                with open(self.path, "w") as fh:
                    fh.write(json.dumps(doc, indent=4))
        except OSError as e:
            raise EmaError(f"cannot write: {e.strerror or hdf5_fmt._msg(e)}", path=self.shown) from None

    def _zip(self) -> None:
        """The newest input's members in its order; its weights replaced by ours.
        Stored, as Keras stores them (so the next reader maps them in place).
        The weights were written as a file of the staging directory first (HDF5
        writes at offsets and grows the file; a zip member is written front to
        back with its size and CRC): one extra sequential copy of the weights."""
        src = self._template.archive
        out = os.path.join(os.path.dirname(self.path), "archive" + ARCHIVE_SUFFIX)
        size = os.path.getsize(self.path)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for info in src.members:
                zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                zi.compress_type = zipfile.ZIP_STORED
                zi.external_attr = info.external_attr
                if info.filename == WEIGHTS:
                    zi.file_size = size
                    with open(self.path, "rb") as r, zf.open(zi, "w", force_zip64=size >= (1 << 31)) as w:
                        shutil.copyfileobj(r, w, 1 << 20)
                elif info.is_dir():
                    zf.writestr(zi, b"")
                else:
                    try:
                        with src.zip.open(info) as r, zf.open(zi, "w", force_zip64=info.file_size >= (1 << 31)) as w:
                            shutil.copyfileobj(r, w, 1 << 20)
                    except _ZIP_ERRORS as e:
                        raise EmaError(f"cannot copy {info.filename}: {hdf5_fmt._msg(e)}", path=src.path) from None
        os.unlink(self.path)

    def abort(self) -> None:
        for w in self._writers:
            w.abort()


Writer = KerasWriter


class KerasFormat(base.Format):
    name = NAME
    reader = staticmethod(Reader)
    writer = KerasWriter

    claim_path = staticmethod(claim_path)
    scan_dir = staticmethod(scan_dir)
    is_output = staticmethod(is_output)
    make_staging = staticmethod(make_staging)


FORMAT = KerasFormat()
