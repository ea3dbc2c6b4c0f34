"""What every checkpoint format provides: a reader and a writer.

The engine talks to formats only through these classes, so it never knows
which format it handles.  A format module (``formats/<name>_fmt.py``) defines:

* ``NAME``: its name on the command line (``--format NAME``);
* ``claim_path(path, *, skip_missing=False) -> list[Source] | None``: the checkpoints an input path
  (a file, a prefix, an index) denotes, or None when it is not this format;
* ``scan_dir(path) -> list[Source]``: the checkpoints directly in a directory;
* ``is_output(path) -> bool``: whether an output path's suffix means this format;
* ``Reader(source)`` and ``Writer(...)``, below.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ema_cli import dtypes
from ema_cli.errors import EmaError


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor's name, canonical dtype and shape: known without reading data.

    Slots and a precomputed ``numel``: a header may list millions of tensors,
    and this is the one object kept per tensor (about 80 bytes each)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: where the reader finds the data (safetensors: the byte offset); private to
    #: the reader that made it, not part of equality (-1: not given)
    offset: int = field(default=-1, compare=False, repr=False)
    numel: int = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "numel", math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


#: what a tensor is to the training code that wrote it
PARAMETER = "parameter"  # a trained weight: averaged
BUFFER = "buffer"  # a float model state that is not trained (BatchNorm statistics): averaged, but
#                    post-hoc EMA takes it from the newest snapshot (signed weights could make a variance negative)
OPTIMIZER = "optimizer"  # optimizer state (slots, moments, its counters): copied from the newest
COUNTER = "counter"  # step / epoch / save counters: copied
OTHER = "other"  # anything else not averaged (strings, integers, bool, the TF2 object graph)
AVERAGED_KINDS = frozenset({PARAMETER, BUFFER})

# float buffers that are model state but not parameters, by the names frameworks give them
_BUFFER_SEGMENT = re.compile(r"^(moving_mean|moving_variance|running_mean|running_var|moving_var)$")


@dataclass(frozen=True)
class Role:
    """What a tensor is (``kind``, one of the constants above) and why the reader
    thinks so (``why``: ``object graph: model variable``, ``name rules``, ...)."""

    kind: str
    why: str

    @property
    def averaged(self) -> bool:
        return self.kind in AVERAGED_KINDS


def is_buffer_name(name: str) -> bool:
    """A BatchNorm-style statistics buffer by its name's last segment
    (``bn.running_mean``, ``bn/moving_variance``, ``.../moving_mean/.ATTRIBUTES/VARIABLE_VALUE``)."""
    head = name.partition("/.ATTRIBUTES/")[0]
    last = re.split(r"[/.]", head)[-1]
    return bool(_BUFFER_SEGMENT.match(last))


@dataclass(frozen=True)
class Source:
    """One checkpoint on disk: picklable, so a worker anywhere can reopen it."""

    format: str
    path: str  # the checkpoint's identity: a file, an index file, or a TF prefix
    files: tuple[str, ...] = field(default=())  # every file that belongs to it
    name_hint: str = ""  # the name its step number is parsed from
    # reader options given on the command line, as (key, value) pairs: picklable, so a
    # reader opened anywhere reads the checkpoint the same way (``state_key``: PyTorch)
    options: tuple[tuple[str, str], ...] = field(default=())

    @property
    def label(self) -> str:
        return self.path


class Reader(ABC):
    """Lists tensors without loading data; reads one tensor at a time."""

    format: str = ""

    def __init__(self, source: Source):
        self.source = source

    @property
    def path(self) -> str:
        return self.source.path

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor, in the file's order, without reading any data."""

    @abstractmethod
    def read(self, name: str) -> np.ndarray:
        """One tensor's values (may be a read-only memory-mapped view).

        String tensors come back as numpy object arrays of bytes.
        """


    def read_flat(self, names: list[str]) -> np.ndarray:
        """Several tensors of one dtype as one flat array, in the order given (the
        engine's batches of small tensors).  By default their concatenation; a
        format may return one view when they lie side by side in the file."""
        return np.concatenate([np.asarray(self.read(n)).reshape(-1) for n in names])
    def metadata(self) -> dict[str, str]:
        """Free-form string metadata the format carries (safetensors ``__metadata__``)."""
        return {}

    def step(self) -> int | None:
        """The training step stored in the checkpoint, if it has a step counter."""
        return None

    def role(self, info: TensorInfo) -> Role:
        """What the tensor is, decided from the structure the framework wrote where
        the format has one (TF2 object graph, ``.meta`` collections, Keras layer
        layout, state-dict nesting), else from names.  The default: floats are
        parameters (or buffers by :func:`is_buffer_name`), everything else copied."""
        if not dtypes.is_float(info.dtype):
            return Role(OTHER, f"{info.dtype}: not floating point")
        if is_buffer_name(info.name):
            return Role(BUFFER, "name rules: statistics buffer")
        return Role(PARAMETER, "floating point")

    def averaged_by_default(self, info: TensorInfo) -> bool:
        """Whether the tensor is a model weight averaged when no option says otherwise
        (float8 tensors are then still copied unless --dtype is given: see engine)."""
        return self.role(info).averaged

    def extras(self) -> dict[str, Any]:
        """Format-specific facts for ``inspect`` (e.g. TF object-graph presence)."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Writer(ABC):
    """Streams tensors out.  ``write`` may be called from several threads, in any
    order, exactly once per tensor; ``close`` finishes the files.  Writers write
    into a staging path given by the engine, which renames it into place."""

    @abstractmethod
    def write(self, name: str, array: np.ndarray) -> None: ...

    def write_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Several whole tensors at once (the engine's batches of small tensors):
        by default one ``write`` each; a format may coalesce them (safetensors
        writes a run of neighbours with one system call)."""
        for name, array in items:
            self.write(name, array)

    @abstractmethod
    def close(self) -> None: ...

    def abort(self) -> None:
        """Release handles after a failure (the staging area is removed by the caller)."""


def step_from_scalar(arr: np.ndarray) -> int | None:
    """An integer scalar (or 1-element) tensor's value, else None."""
    a = np.asarray(arr)
    if a.size != 1 or a.dtype.kind not in "iu":
        return None
    return int(a.reshape(-1)[0])


def load_weight_map_index(index: Path, what: str) -> dict:
    """A Hugging Face shard index (``model.safetensors.index.json``,
    ``pytorch_model.bin.index.json``): its JSON, with a ``weight_map`` object
    whose every value is a plain file name beside the index.  ``what`` names
    the kind of index in the errors."""
    try:
        doc = json.loads(Path(index).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmaError(f"not a readable {what}: {e}", path=str(index)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise EmaError(f"{what} has no 'weight_map' object", path=str(index))
    for k, v in doc["weight_map"].items():
        if not isinstance(v, str) or "/" in v or v in ("", ".", ".."):
            raise EmaError(f"index maps {k!r} to an invalid file name {v!r}", path=str(index))
    return doc
