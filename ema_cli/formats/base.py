"""What every checkpoint format provides: a reader and a writer.

The engine talks to formats only through these classes, so it never knows
which format it handles.  A format module (``formats/<name>_fmt.py``) defines:

* ``NAME``: its name on the command line (``--format NAME``);
* ``claim_path(path) -> list[Source] | None``: the checkpoints an input path
  (a file, a prefix, an index) denotes, or None when it is not this format;
* ``scan_dir(path) -> list[Source]``: the checkpoints directly in a directory;
* ``is_output(path) -> bool``: whether an output path's suffix means this format;
* ``Reader(source)`` and ``Writer(...)``, below.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ema_cli import dtypes


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, canonical dtype and shape: known without reading data."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class Source:
    """One checkpoint on disk: picklable, so a worker anywhere can reopen it."""

    format: str
    path: str  # the checkpoint's identity: a file, an index file, or a TF prefix
    files: tuple[str, ...] = field(default=())  # every file that belongs to it
    name_hint: str = ""  # the name its step number is parsed from

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

    def metadata(self) -> dict[str, str]:
        """Free-form string metadata the format carries (safetensors ``__metadata__``)."""
        return {}

    def step(self) -> int | None:
        """The training step stored in the checkpoint, if it has a step counter."""
        return None

    def averaged_by_default(self, info: TensorInfo) -> bool:
        """Whether the tensor is a model weight averaged when no option says otherwise
        (float8 tensors are then still copied unless --dtype is given: see engine)."""
        return dtypes.is_float(info.dtype)

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
