"""PyTorch checkpoints: ``torch.save`` files (zip, and legacy pickles before torch 1.6).

Covers fairseq ``checkpoint_N.pt``, timm ``checkpoint-N.pth.tar``, Lightning and
NeMo ``epoch=E-step=S.ckpt``, the HF Trainer's ``pytorch_model.bin`` (sharded
too, with ``pytorch_model.bin.index.json``) and plain ``torch.save(state_dict)``.

Safety: files are loaded only with ``torch.load(weights_only=True)``, the
restricted unpickler that builds tensors, containers and primitive values and
refuses every other class: no code from a file ever runs.  A file that needs
full unpickling is refused with the class it names.

Reading: zip files are loaded with ``mmap=True``, so a tensor's data is a view
of the file mapping, handed to the engine as a numpy view (bfloat16 and float8
through same-width integer views), never copied.  Legacy files cannot be mapped
by torch and are loaded whole (with a warning).

Structure: the state dict is the top level, or the first of ``state_dict``,
``model``, ``module``, ``model_state_dict`` that holds tensors (``--state-key``
names another, e.g. ``state_dict_ema``).  Its tensors, nested dicts flattened
with ``.`` names, are the reader's tensors; everything else (optimizer states,
schedulers, RNG states, counters, hyper-parameters, callbacks) is carried
verbatim from the newest checkpoint into ``.pt`` output by the writer.

Writing: the averaged tensors are written into a scratch file mapping (an
unlinked file beside the output: file-backed pages, not anonymous memory), then
``torch.save`` writes the newest input's structure with the averaged state dict
in place to the staging path.  Names that share one tensor in the template
(tied embeddings) share one tensor in the output again.
"""

from __future__ import annotations

import mmap
import os
import pickle
import re
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ema_cli import dtypes
from ema_cli.errors import EmaError, UsageError
from ema_cli.formats.base import is_training_state, step_hint
from ema_cli.formats.base import BUFFER, OTHER, PARAMETER, Format, Reader, Role, Source, TensorInfo, Writer, is_buffer_name, \
    load_weight_map_index
from ema_cli.output import Staged, check_target

NAME = "torch"
INSTALL_HINT = "reading or writing PyTorch checkpoints needs PyTorch: pip install 'ema-avg[torch]'"
INPUT_SUFFIXES = (".pth.tar", ".pt", ".pth", ".ckpt", ".bin")
OUTPUT_SUFFIXES = (".pt", ".pth", ".bin")
INDEX_SUFFIX = ".bin.index.json"
#: where the weights are, in this order, when --state-key does not say
STATE_KEYS = ("state_dict", "model", "module", "model_state_dict")
#: step counters of the top-level dict, in this order (epoch is the last resort)
STEP_KEYS = ("global_step", "step", "num_updates", "iteration", "epoch")
#: files the HF Trainer writes beside the model in checkpoint-N/: training state, never a checkpoint
#: copies of another checkpoint that trainers keep beside them (Lightning save_last, fairseq)
COPY_RE = re.compile(r"^(last(-v\d+)?\.ckpt|checkpoint_last\.pt|checkpoint_best\.pt)$")
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}\.bin$")
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy format starts with the pickled magic number 0x1950a86a20f9469cfc6c (LONG1)
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_ALIGN = 64

_torch = None
_torch_lock = threading.Lock()
_state_key_default: str | None = None


def import_torch(path: str | None = None):
    """``torch``, imported on first use; without it an EmaError naming ``path`` with the install hint."""
    global _torch
    if _torch is not None:
        return _torch
    with _torch_lock:
        if _torch is None:
            try:
                import torch
            except ImportError as e:
                missing = getattr(e, "name", None)
                detail = "" if missing in (None, "torch") else f" (importing it failed: {e})"
                raise EmaError(INSTALL_HINT + detail, path=path) from None
            except Exception as e:  # a broken installation
                raise EmaError(f"PyTorch failed to import: {type(e).__name__}: {e}", path=path) from None
            _torch = torch
    return _torch


def set_state_key(key: str | None) -> None:
    """The ``--state-key`` of this process (readers whose Source carries no
    ``state_key`` option use it)."""
    global _state_key_default
    _state_key_default = key or None


# --------------------------------------------------------------------------- dtypes

_TORCH_NAMES = {
    "float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2", "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2fnuz": "float8_e5m2fnuz", "float8_e8m0fnu": "float8_e8m0fnu",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8",
    "uint64": "uint64", "uint32": "uint32", "uint16": "uint16", "uint8": "uint8",
    "bool": "bool", "complex64": "complex64", "complex128": "complex128",
}
# dtypes numpy cannot hold natively: read through an integer view of the same width
_VIA_INT = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8", "float8_e4m3fnuz": "uint8",
            "float8_e5m2fnuz": "uint8", "float8_e8m0fnu": "uint8"}


def can_store(dtype: str) -> bool:
    return dtype in _TORCH_NAMES


def _canonical(t) -> str | None:
    return _TORCH_NAMES.get(str(t.dtype).removeprefix("torch."))


def _to_numpy(t) -> np.ndarray:
    """A numpy view of a CPU tensor's data (no copy)."""
    torch = _torch
    name = _canonical(t)
    via = _VIA_INT.get(name)
    if via is not None:
        arr = t.view(getattr(torch, via)).numpy().view(dtypes.to_numpy(name))
    else:
        arr = t.numpy()
    arr = arr.view()
    arr.flags.writeable = False
    return arr


# --------------------------------------------------------------------------- discovery


def _signature(path: Path) -> str | None:
    """``zip``, ``legacy`` (a torch.save pickle) or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2:2 + len(_LEGACY_MAGIC)] == _LEGACY_MAGIC:
        return "legacy"
    return None


def _input_suffix(name: str) -> bool:
    return name.endswith(INPUT_SUFFIXES)


def is_output(path: str) -> bool:
    """``.pt``, ``.pth``, ``.bin``.  (``.ckpt`` is a TensorFlow prefix unless the
    registry routes it here: see the module notes in the README.)"""
    return path.endswith(OUTPUT_SUFFIXES) and not path.endswith(INDEX_SUFFIX)


def is_output_given_inputs(path: str, input_formats) -> bool:
    """The ``.ckpt`` rule for the registry: ``.ckpt`` is a TensorFlow prefix,
    except when every input is a PyTorch file (Lightning, NeMo), where the
    output follows the inputs.  ``--format`` decides before this is asked."""
    return is_output(path) or (path.endswith(".ckpt") and set(input_formats) == {NAME})


def _hint(path: Path) -> str:
    stem = path.name
    for s in INPUT_SUFFIXES:
        if stem.endswith(s):
            stem = stem[: -len(s)]
            break
    return step_hint(path.name, stem, path.parent.name)


def _sharded_source(index: Path) -> Source:
    files = _index_files(index)
    hint = index.parent.name if index.name.startswith("pytorch_model") else index.name
    return Source(NAME, str(index), (str(index), *files), name_hint=hint)


def _load_index(index: Path) -> dict:
    return load_weight_map_index(index, "PyTorch shard index")


def _index_files(index: Path) -> list[str]:
    return [str(index.parent / f) for f in dict.fromkeys(_load_index(index)["weight_map"].values())]


def claim_path(path: Path, *, skip_missing: bool = False) -> list[Source] | None:
    path = Path(path)
    name = path.name
    if not path.is_file():
        return None
    if name.endswith(INDEX_SUFFIX):
        return [_sharded_source(path)]
    if not _input_suffix(name):
        return None
    sig = _signature(path)
    if sig is None:
        if name.endswith(".bin"):
            return None  # .bin is any binary file
        if not os.access(path, os.R_OK):
            raise EmaError("cannot open: permission denied", path=str(path))
        raise EmaError("not a PyTorch file (neither a torch.save zip archive nor a legacy torch pickle)",
                       path=str(path))
    if name.endswith(".bin") and _SHARD_RE.search(name):
        for index in sorted(path.parent.glob("*" + INDEX_SUFFIX)):
            if name in {Path(f).name for f in _index_files(index)}:
                return [_sharded_source(index)]
    return [Source(NAME, str(path), (str(path),), name_hint=_hint(path))]


def scan_dir(path: Path) -> list[Source]:
    """Every PyTorch checkpoint directly in the directory.  The HF Trainer's
    training state beside the model (``optimizer.pt``, ``scheduler.pt``,
    ``scaler.pt``, ``rng_state*.pth``, ``training_args.bin``) is not a
    checkpoint; sharded ``pytorch_model-0000K-of-0000N.bin`` with their index
    are one."""
    path = Path(path)
    out = [_sharded_source(i) for i in sorted(path.glob("*" + INDEX_SUFFIX)) if i.is_file()]
    listed = {f for s in out for f in s.files}
    copies: list[str] = []
    for f in sorted(path.iterdir()):
        if str(f) in listed or not f.is_file() or f.name.startswith(".") or not _input_suffix(f.name):
            continue
        if is_training_state(f.name):
            continue
        if COPY_RE.match(f.name):
            copies.append(f.name)
            continue
        if _signature(f) is None:
            continue
        out.extend(claim_path(f) or [])
    if copies and out:
        from ema_cli.notices import warn

        warn(f"{path}: skipped {', '.join(copies)}: a trainer's copy of another checkpoint "
             "(name it explicitly to use it)")
    elif copies:
        out.extend(s for c in copies for s in (claim_path(path / c) or []))
    return out


# --------------------------------------------------------------------------- loading


def _check_zip(path: str) -> None:
    """The archive's own structure, before torch reads it: one top-level folder
    holding ``data.pkl``, every record stored uncompressed and inside the file."""
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise EmaError(f"not a readable PyTorch zip archive: {e}", path=path) from None
    if not infos:
        raise EmaError("empty zip archive: not a torch.save file", path=path)
    roots = {i.filename.split("/", 1)[0] for i in infos}
    if len(roots) != 1 or not any(i.filename.endswith("/data.pkl") for i in infos):
        raise EmaError("zip archive without a torch.save layout (<name>/data.pkl)", path=path)
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED:
            raise EmaError(f"record {i.filename} is compressed: torch.save stores records uncompressed", path=path)
        if i.header_offset + 30 + len(i.filename) + i.file_size > size:
            raise EmaError(f"truncated: record {i.filename} ends beyond the end of the file", path=path)


def _refusal(e: Exception) -> str:
    """Why torch's restricted unpickler refused the file, in one line."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return (f"needs full unpickling: it refers to {m.group(1)} (a class or function), which "
                "torch.load(weights_only=True) refuses to load; ema-avg never runs code from a checkpoint "
                "(save model.state_dict() instead)")
    m = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    detail = m.group(1).strip() if m else " ".join(text.split())[:200]
    return f"needs full unpickling or is corrupt (torch.load(weights_only=True) refused it: {detail})"


def _load(path: str, legacy_ok: bool = True):
    torch = import_torch(path)
    sig = _signature(Path(path))
    if sig is None:
        raise EmaError("not a PyTorch file (neither a torch.save zip archive nor a legacy torch pickle)", path=path)
    if sig == "zip":
        _check_zip(path)
    else:
        from ema_cli.notices import warn

        warn(f"{path}: legacy (non-zip) PyTorch file: loaded whole into memory, not memory-mapped "
             "(re-save it with a current torch.save to stream it)")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=(sig == "zip")), sig
    except pickle.UnpicklingError as e:
        raise EmaError(_refusal(e), path=path) from None
    except MemoryError:
        raise EmaError("cannot load: out of memory (corrupt sizes?)", path=path) from None
    except Exception as e:  # torch reports corrupt archives as RuntimeError, ValueError, EOFError, ...
        msg = " ".join(str(e).split())
        msg = msg[:300] + ("..." if len(msg) > 300 else "")
        raise EmaError(f"cannot load with torch.load: {type(e).__name__}: {msg}", path=path) from None


def _is_tensor(v) -> bool:
    return isinstance(v, _torch.Tensor)


def _has_tensor(v, depth: int = 0) -> bool:
    if _is_tensor(v):
        return True
    if isinstance(v, dict) and depth < 64:
        return any(_has_tensor(x, depth + 1) for x in v.values())
    return False


def _is_optimizer_state(d) -> bool:
    return isinstance(d, dict) and set(d) == {"state", "param_groups"}


def _resolve_key(obj, key: str, path: str):
    """``a.b`` through nested dicts (a key holding dots is matched whole first)."""
    node, parts, rest = obj, [], key
    while rest:
        if not isinstance(node, dict):
            raise EmaError(f"--state-key {key!r}: {'.'.join(map(str, parts)) or 'the top level'} is not a dict",
                           path=path)
        for k in sorted((k for k in node if isinstance(k, str)), key=len, reverse=True):
            if rest == k or rest.startswith(k + "."):
                node, rest = node[k], rest[len(k) + 1:]
                parts.append(k)
                break
        else:
            have = ", ".join(repr(k) for k in list(node)[:8])
            raise EmaError(f"--state-key {key!r}: no key {rest!r} (keys: {have})", path=path)
    return node, tuple(parts)


def _find_state_dict(obj, path: str, key: str | None):
    """(state dict, its key path from the top level, how it was found)."""
    if key:
        sd, where = _resolve_key(obj, key, path)
        if not isinstance(sd, dict) or not _has_tensor(sd):
            raise EmaError(f"--state-key {key!r} holds no tensors", path=path)
        return sd, where, "--state-key"
    if not isinstance(obj, dict):
        raise EmaError(f"holds a {type(obj).__name__}, not a dict of tensors (a state dict)", path=path)
    for k in STATE_KEYS:
        v = obj.get(k)
        if isinstance(v, dict) and _has_tensor(v) and not _is_optimizer_state(v):
            return v, (k,), f"key {k!r}"
    if _is_optimizer_state(obj):
        raise EmaError("holds an optimizer state dict (state, param_groups), not model weights", path=path)
    if any(_is_tensor(v) for v in obj.values()):
        return obj, (), "top level"
    keys = ", ".join(repr(k) for k in list(obj)[:10])
    raise EmaError(f"no state dict found (none of {', '.join(STATE_KEYS)} holds tensors, and the top level has "
                   f"no tensors; keys: {keys}); name it with --state-key", path=path)


def _flatten(sd, path: str, skip_optimizer: bool):
    """name -> (key path inside the state dict, tensor); and the non-tensor entries."""
    tensors: dict[str, tuple[tuple, Any]] = {}
    other: list[str] = []

    def walk(d, prefix: str, keys: tuple, depth: int):
        for k, v in d.items():
            name = f"{prefix}{k}"
            if _is_tensor(v):
                if name in tensors:
                    raise EmaError("two entries of the state dict flatten to this name", path=path, tensor=name)
                tensors[name] = ((*keys, k), v)
            elif isinstance(v, dict) and v and depth < 64 and not (skip_optimizer and _is_optimizer_state(v)) \
                    and _has_tensor(v):
                walk(v, name + ".", (*keys, k), depth + 1)
            else:
                other.append(name)

    walk(sd, "", (), 0)
    return tensors, other


def _check_tensor(t, path: str, name: str) -> str:
    torch = _torch
    dt = _canonical(t)
    if dt is None:
        raise EmaError(f"dtype {t.dtype} is not supported", path=path, tensor=name)
    if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
        raise EmaError(f"{t.layout} tensor on {t.device}: only dense tensors are supported", path=path, tensor=name)
    if t.numel():
        st = t.untyped_storage()
        item = t.element_size()
        if any(s < 0 for s in t.stride()) or t.storage_offset() < 0:
            raise EmaError("negative strides or offset", path=path, tensor=name)
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        if (last + 1) * item > st.nbytes():
            raise EmaError(f"its storage holds {st.nbytes()} bytes, fewer than its shape {list(t.shape)} and "
                           f"strides need ({(last + 1) * item})", path=path, tensor=name)
    return dt


def _view_key(t):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _step_value(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if _torch is not None and _is_tensor(v) and v.numel() == 1 and not v.is_floating_point() \
            and v.dtype != _torch.bool and not v.is_complex():
        return int(v.reshape(-1)[0].item())
    return None


# --------------------------------------------------------------------------- reading


class TorchReader(Reader):
    format = NAME

    def __init__(self, source: Source, state_key: str | None = None):
        super().__init__(source)
        if state_key is None:
            state_key = dict(source.options).get("state_key", _state_key_default)
        self.state_key = state_key
        self.legacy = False
        self.shards: list[str] = []
        if source.path.endswith(INDEX_SUFFIX):
            self._open_sharded(Path(source.path))
        else:
            self.obj, sig = _load(source.path)
            self.legacy = sig == "legacy"
            self.sd, self.sd_path, self.found = _find_state_dict(self.obj, source.path, state_key)
            self._entries, self.not_tensors = _flatten(self.sd, source.path, skip_optimizer=not self.sd_path)
        self._infos: dict[str, TensorInfo] = {}
        self.tied: dict[str, str] = {}  # alias -> the first name of the same tensor
        first: dict[tuple, str] = {}
        for name, (_keys, t) in self._entries.items():
            dt = _check_tensor(t, source.path, name)
            self._infos[name] = TensorInfo(name, dt, tuple(int(n) for n in t.shape))
            if t.numel():
                k = _view_key(t)
                if k in first:
                    self.tied[name] = first[k]
                else:
                    first[k] = name

    def _open_sharded(self, index: Path) -> None:
        doc = _load_index(index)
        merged: OrderedDict = OrderedDict()
        entries: dict[str, tuple[tuple, Any]] = {}
        self.not_tensors = []
        for fname in dict.fromkeys(doc["weight_map"].values()):
            fpath = str(index.parent / fname)
            if not os.path.exists(fpath):
                raise EmaError(f"shard {fname} listed in the index is missing", path=str(index))
            obj, sig = _load(fpath)
            self.legacy |= sig == "legacy"
            sd, _where, _how = _find_state_dict(obj, fpath, None)
            if _where:
                raise EmaError("a shard of a sharded checkpoint is not a plain state dict", path=fpath)
            ents, other = _flatten(sd, fpath, skip_optimizer=True)
            self.not_tensors += other
            for name, (keys, t) in ents.items():
                if doc["weight_map"].get(name) != fname:
                    raise EmaError(f"{fname} holds a tensor the index does not place there", path=str(index),
                                   tensor=name)
                entries[name] = ((name,), t)
                merged[name] = t
            self.shards.append(fpath)
        for name, fname in doc["weight_map"].items():
            if name not in entries:
                raise EmaError(f"index places tensor in {fname}, which lacks it", path=str(index), tensor=name)
        self.obj, self.sd, self.sd_path, self.found = merged, merged, (), f"{len(self.shards)} shards"
        self._entries = entries

    # the Reader API

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        return _to_numpy(self._entries[name][1])

    def role(self, info: TensorInfo) -> Role:
        if not dtypes.is_float(info.dtype):
            return Role(OTHER, f"state dict: {info.dtype}, not floating point")
        if is_buffer_name(info.name):
            return Role(BUFFER, "state dict: statistics buffer")
        tied = f" (tied to {self.tied[info.name]})" if info.name in self.tied else ""
        return Role(PARAMETER, "state dict: floating point" + tied)

    def metadata(self) -> dict[str, str]:
        """``format: pt``, as ``save_pretrained`` tags PyTorch tensors in safetensors
        (transformers refuses a safetensors file whose metadata lacks it)."""
        return {"format": "pt"}

    def step(self) -> int | None:
        top = self.obj if isinstance(self.obj, dict) else {}
        for k in STEP_KEYS:
            if k == "num_updates":
                for holder in (top, top.get("extra_state"), _last(top.get("optimizer_history"))):
                    s = _step_value(holder.get(k)) if isinstance(holder, dict) else None
                    if s is not None:
                        return s
                continue
            s = _step_value(top.get(k))
            if s is not None:
                return s
        return None

    def outside_state_dict(self) -> list[str]:
        """Top-level entries that are not (and do not hold) the state dict: kept
        only by PyTorch output."""
        if not self.sd_path or not isinstance(self.obj, dict):
            return []
        return [str(k) for k in self.obj if k != self.sd_path[0]]

    def extras(self) -> dict[str, Any]:
        return {
            "averaged_from": "state dict",
            "state_dict": ".".join(map(str, self.sd_path)) if self.sd_path else "(top level)",
            "state_dict_found_by": self.found,
            "outside_state_dict": self.outside_state_dict(),
            "not_tensors": list(self.not_tensors),
            "tied": dict(self.tied),
            "legacy_format": self.legacy,
            "files": self.shards or [self.source.path],
        }

    def rebuild(self, tensors: dict[str, Any]):
        """The loaded object with the state dict's tensors replaced: ``tensors``
        maps flattened names to new tensors (names not in the state dict are added
        at its top level; state-dict tensors not given are dropped)."""
        import copy

        def copy_path(node, keys):  # shallow copies of the containers on the way to the state dict
            node = copy.copy(node)
            if keys:
                node[keys[0]] = copy_path(node[keys[0]], keys[1:])
            return node

        root = copy_path(self.obj, self.sd_path)
        sd = root
        for k in self.sd_path:
            sd = sd[k]
        copied = {id(sd)}
        for name, (keys, _t) in self._entries.items():
            holder = sd
            for k in keys[:-1]:
                if id(holder[k]) not in copied:
                    holder[k] = copy.copy(holder[k])
                    copied.add(id(holder[k]))
                holder = holder[k]
            if name in tensors:
                holder[keys[-1]] = tensors[name]
            else:
                del holder[keys[-1]]
        for name, t in tensors.items():
            if name not in self._entries:
                sd[name] = t
        return root

    def close(self) -> None:
        self.obj = self.sd = None
        self._entries = {}


def _last(v):
    return v[-1] if isinstance(v, list) and v else None


Reader = TorchReader


# --------------------------------------------------------------------------- writing


def make_staging(output: str, *, sharded: bool, force: bool) -> Staged:
    if sharded:
        raise UsageError("PyTorch output is a single file: --max-shard-size applies to safetensors output")
    check_target(output, force=force, is_dir=False)
    return Staged(output, force=force)


class TorchWriter(Writer):
    """``.pt`` output: the newest input's structure (a PyTorch template) with the
    averaged state dict in place, or a plain state dict (any other template).

    Tensors are computed into a scratch file mapping (unlinked at once, so nothing
    is left behind), one region per tensor; ``close`` hands tensors viewing those
    regions to ``torch.save``, which writes them to the staging path."""

    writes_ranges = True

    def __init__(self, path: str, shards: list[list[TensorInfo]], metadata: dict[str, str], template=None):
        if len(shards) > 1:
            raise UsageError("PyTorch output is a single file: --max-shard-size applies to safetensors output")
        import_torch(path)
        self.path = path
        self._infos = {i.name: i for i in (shards[0] if shards else [])}
        self._template = template if isinstance(template, TorchReader) else None
        self._pending = set(self._infos)
        self._fd, self._mm = -1, None
        self._arrays: dict[str, np.ndarray] = {}
        layout, pos = {}, 0
        for info in self._infos.values():
            if not can_store(info.dtype):
                raise EmaError(f"PyTorch output cannot store dtype {info.dtype}", tensor=info.name)
            pos = -(-pos // _ALIGN) * _ALIGN
            layout[info.name] = pos
            pos += info.nbytes
        try:
            scratch = f"{path}-scratch-{os.getpid()}.tmp"
            self._fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.unlink(scratch)
            if pos:
                try:
                    if hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(self._fd, 0, pos)
                    else:
                        os.ftruncate(self._fd, pos)
                except OSError as e:
                    raise EmaError(f"cannot reserve {pos} bytes of scratch space: {e.strerror}", path=path) from None
                self._mm = mmap.mmap(self._fd, pos)
                buf = np.frombuffer(self._mm, dtype=np.uint8)
                for name, off in layout.items():
                    info = self._infos[name]
                    dt = dtypes.to_numpy(info.dtype)
                    self._arrays[name] = buf[off:off + info.nbytes].view(dt).reshape(info.shape)
            for name, info in self._infos.items():
                if name not in self._arrays:
                    self._arrays[name] = np.zeros(info.shape, dtype=dtypes.to_numpy(info.dtype))
        except OSError as e:
            self.abort()
            raise EmaError(f"cannot create scratch space: {e.strerror}", path=path) from None
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, array: np.ndarray) -> None:
        dst = self._arrays[name]
        src = np.asarray(array)
        if src.shape != dst.shape:
            raise EmaError(f"internal: shape {src.shape} != {dst.shape}", tensor=name)
        np.copyto(dst, src.astype(dst.dtype, copy=False))
        self._pending.discard(name)

    def write_range(self, name: str, start: int, flat: np.ndarray) -> None:
        dst = self._arrays[name].reshape(-1)
        if flat.dtype != dst.dtype or flat.ndim != 1 or not 0 <= start <= dst.size - flat.size:
            raise EmaError(f"internal: bad range {start}+{flat.size} ({flat.dtype}) of {dst.size} {dst.dtype}",
                           tensor=name)
        dst[start:start + flat.size] = flat
        if start + flat.size == dst.size:
            self._pending.discard(name)

    def _tensor(self, name: str):
        torch = _torch
        arr = self._arrays[name]
        info = self._infos[name]
        via = _VIA_INT.get(info.dtype)
        if via is not None:
            t = torch.from_numpy(arr.view(np.dtype(via))).view(getattr(torch, info.dtype))
        else:
            t = torch.from_numpy(arr)
        return t

    def close(self) -> None:
        from ema_cli.notices import warn

        if self._pending:
            raise EmaError(f"internal: {len(self._pending)} tensors never written", path=self.path)
        torch = import_torch(self.path)
        out = {name: self._tensor(name) for name in self._infos}
        tmpl = self._template
        if tmpl is not None:
            split = []
            for alias, first in tmpl.tied.items():
                if alias in out and first in out:
                    a, b = self._arrays[alias], self._arrays[first]
                    if a.dtype == b.dtype and a.shape == b.shape and _same_bytes(a, b):
                        out[alias] = out[first]  # one tensor again, as in the input
                    else:
                        split.append(f"{alias} / {first}")
            if split:
                warn(f"{len(split)} tied tensor pair(s) got different values (--include/--exclude or --dtype "
                     f"treat them differently) and are written as separate tensors: {', '.join(split[:3])}")
            dropped = [n for n in tmpl.tensors() if n not in out]
            if dropped:
                warn(f"{len(dropped)} tensor(s) of the newest checkpoint's state dict are not in the output: "
                     f"{', '.join(dropped[:3])}")
            obj = tmpl.rebuild(out)
        else:
            obj = OrderedDict(out)
        try:
            torch.save(obj, self.path)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise EmaError(f"cannot write: {e.strerror}", path=self.path) from None
        except RuntimeError as e:
            raise EmaError(f"cannot write: {' '.join(str(e).split())[:300]}", path=self.path) from None
        finally:
            del obj, out
            self._release()

    def _release(self) -> None:
        self._arrays.clear()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views still alive; the map goes with them
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        self._release()


def _same_bytes(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 24) -> bool:
    fa, fb = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    return all(np.array_equal(fa[i:i + chunk], fb[i:i + chunk]) for i in range(0, fa.size, chunk))


Writer = TorchWriter


class TorchFormat(Format):
    name = NAME
    reader = TorchReader
    writer = TorchWriter

    claim_path = staticmethod(claim_path)
    scan_dir = staticmethod(scan_dir)
    is_output = staticmethod(is_output)
    is_output_given_inputs = staticmethod(is_output_given_inputs)
    can_store = staticmethod(can_store)
    make_staging = staticmethod(make_staging)


FORMAT = TorchFormat()
