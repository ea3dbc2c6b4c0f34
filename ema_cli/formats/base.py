"""The format contract: :class:`Format`, :class:`Reader` and :class:`Writer`.

The engine talks to formats only through these classes, so it never knows
which format it handles.  A format module (``formats/<name>_fmt.py``) defines
a :class:`Format` subclass and exposes one instance of it as ``FORMAT``; the
registry (``formats.get(name)``) hands that instance out.

Optional capabilities are declared, never discovered: a format that can do
more says so with a class attribute and overrides the method, and every
method has a default that is right for a format that cannot:

* ranges (``Writer.writes_ranges``, ``Writer.write_range``): averaged tensors
  stream into the writer chunk by chunk instead of being held whole;
* page release (``Reader.release``): consumed input pages leave the process;
* staging (``Format.make_staging``): a format whose output is several files
  (a TF prefix) stages and commits them itself;
* shard files (``Format.shard_files``): each output shard is a file of its
  own, written by its own writer anywhere (a Dask worker), and an index
  written last by the commit;
* remote reads (``Format.remote_reads``): the reader reads fsspec URLs with
  ranged reads; other formats' remote inputs are first copied to a local
  temporary directory;
* raw bits (``Reader.reads_bits``, ``Writer.writes_bits``): tensors of the
  dtypes in ``dtypes.BITS`` (bfloat16) are read, or taken by the writer, as
  their raw bits in ``dtypes.storage_numpy`` (uint16), so that they flow from
  file to kernel to file without ml_dtypes.  The engine computes in raw bits;
  where a writer does not take them it views them as ml_dtypes' type, in one
  place (``execute.for_writer``).
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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


# The files a training framework writes beside the model to resume training,
# by the names the frameworks themselves give them: never a checkpoint to
# average, never copied to an output.  The HF Trainer (transformers'
# trainer.py: OPTIMIZER_NAME optimizer.pt, SCHEDULER_NAME scheduler.pt,
# SCALER_NAME scaler.pt, rng_state[_RANK].pth, TRAINER_STATE_NAME,
# TRAINING_ARGS_NAME); Accelerate's save_state (accelerate.utils.constants and
# checkpointing.py: optimizer[_I].bin, scheduler[_I].bin, sampler[_I].bin,
# dl_state_dict[_I].bin, scaler.pt, random_states_RANK.pkl,
# custom_checkpoint_I.pkl).  (Each reader also refuses, by its structure, a file
# that holds an optimizer state dict or no tensors.)
_TRAINING_STATE = re.compile(
    r"^(optimizer(_\d+)?\.(pt|bin)|scheduler(_\d+)?\.(pt|bin)|sampler(_\d+)?\.bin|dl_state_dict(_\d+)?\.bin"
    r"|scaler\.pt|rng_state(_\d+)?\.pth|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl"
    r"|trainer_state\.json|training_args\.bin)$")


def is_training_state(name: str) -> bool:
    """A file name (no directory) of a framework's training state (above)."""
    return bool(_TRAINING_STATE.match(name))


_ACCELERATE_DIR = re.compile(r"^checkpoint_\d+$")  # ProjectConfiguration(automatic_checkpoint_naming=True)

# names a framework gives every checkpoint's weights file, the step being in the
# directory's name: transformers' model.safetensors / pytorch_model.bin (and
# PEFT's adapter_model, diffusers' diffusion_pytorch_model); Accelerate's
# save_state writes a second model as model_1.safetensors (WEIGHTS_NAME with
# _I), in its checkpoint_N directory (a model_500.safetensors elsewhere is step 500)
_FIXED_WEIGHTS = re.compile(r"^(model|pytorch_model|adapter_model|diffusion_pytorch_model)$")
_ACCELERATE_WEIGHTS = re.compile(r"^(model|pytorch_model)_\d+$")


def step_hint(name: str, stem: str, parent: str) -> str:
    """The name a checkpoint file's step is read from (``Source.name_hint``):
    the file's own (``name``; ``stem`` without its suffix), unless it is a
    framework's fixed weights name or holds no number: then its directory's."""
    if _FIXED_WEIGHTS.match(stem) or not re.search(r"\d", stem) \
            or (_ACCELERATE_WEIGHTS.match(stem) and _ACCELERATE_DIR.match(parent)):
        return parent or name
    return name




def counter_note(directory: Path) -> str:
    """What the number in a checkpoint directory's name is when it is not a
    step: Accelerate's ``save_state`` with automatic naming writes
    ``checkpoints/checkpoint_N`` (N counts the saves, from 0) holding its
    ``random_states_RANK.pkl``."""
    if _ACCELERATE_DIR.match(directory.name) and any(directory.glob("random_states_*.pkl")):
        return (f"{directory.parent}: Accelerate numbers its checkpoint_N directories by save (N = 0, 1, ...), "
                "not by training step")
    return ""


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
    # set when the number in ``name_hint`` is known not to be a training step (a
    # framework's save counter): what it is, for a warning where steps matter
    step_note: str = ""

    @property
    def label(self) -> str:
        return self.path


class Reader(ABC):
    """Lists tensors without loading data; reads one tensor at a time."""

    format: str = ""
    #: capability ``raw bits``: ``read``, ``read_flat`` and ``read_stream`` return
    #: tensors of a dtype in ``dtypes.BITS`` (bfloat16) as their raw bits, in
    #: ``dtypes.storage_numpy(dtype)`` (uint16), never as ml_dtypes arrays.  Without
    #: it they come in ``dtypes.to_numpy(dtype)`` (ml_dtypes' bfloat16).  Consumers
    #: of read arrays go by the tensor's canonical dtype (``dtypes.is_bits``,
    #: ``dtypes.all_finite``, ``dtypes.as_values``), so both are handled.
    reads_bits: ClassVar[bool] = False

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

    def read_stream(self, name: str):
        """A tensor as a flat array for the kernel to stream through block by block
        (``x.size``, ``x.dtype``, ``x[a:b]``, ``x.view(dtype)``).  By default the
        flattened ``read``; a remote reader returns an array-like that fetches its
        blocks with ranged reads, so no tensor is ever held whole."""
        return np.asarray(self.read(name)).reshape(-1)

    def prefetch(self, name: str, first: int = 0, last: int | None = None) -> bool:
        """Capability ``read-ahead``: elements ``[first, last)`` of this tensor
        (all of it by default) will be read soon; a reader of memory-mapped
        data may start reading them from disk now (``MADV_WILLNEED``), so the
        kernel does not wait on one page fault after another.  A hint.  Returns
        whether this reader reads ahead at all (the engine then stops asking
        one that does not); by default it does not (False)."""
        return False

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """Capability ``page release``: the engine is done with elements
        ``[first, last)`` of this tensor (all of it by default); a reader of
        memory-mapped data may drop those pages.  By default: nothing."""

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
    into a staging path given by the engine, which renames it into place.

    Constructed as ``Writer(path, shards, metadata, template=None)``: ``shards``
    the output's tensors per output shard (``TensorInfo`` lists), ``metadata``
    string metadata (the recipe), ``template`` the newest input's reader when
    the output follows its layout (TF ``.meta`` graph, HDF5 groups)."""

    #: capability ``ranges``: ``write_range`` is supported
    writes_ranges: ClassVar[bool] = False
    #: capability ``raw bits``: ``write``, ``write_many`` and ``write_range`` take
    #: tensors of a dtype in ``dtypes.BITS`` (bfloat16) as their raw bits
    #: (``dtypes.storage_numpy``: uint16; ml_dtypes arrays are taken too).  Without
    #: it the engine hands them over as ml_dtypes arrays (``execute.for_writer``).
    writes_bits: ClassVar[bool] = False

    @abstractmethod
    def write(self, name: str, array: np.ndarray) -> None: ...

    def write_range(self, name: str, start: int, flat: np.ndarray) -> None:
        """Elements ``[start, start + flat.size)`` of a tensor in C order (``flat``:
        1-D, contiguous, the tensor's dtype: ``dtypes.storage_numpy`` where
        ``writes_bits``, else ``dtypes.to_numpy``); only where ``writes_ranges``."""
        raise NotImplementedError(f"{type(self).__name__} does not write ranges")

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


class Format:
    """One checkpoint format.  Subclasses set ``name``, ``reader`` and ``writer``
    and override what they can do; every default is right for a format that
    cannot (see the module docstring for the optional capabilities)."""

    name: ClassVar[str] = ""
    #: ``reader(source) -> Reader`` (a Reader subclass, or a function choosing one)
    reader: ClassVar[Any] = None
    #: ``writer(path, shards, metadata, template=None) -> Writer``
    writer: ClassVar[Any] = None
    #: capability ``remote reads``: the reader reads fsspec URLs itself, with ranged reads
    remote_reads: ClassVar[bool] = False
    #: capability ``shard files``: ``open_shard`` / ``write_index`` (HF sharded layout)
    shard_files: ClassVar[bool] = False

    # ---- inputs
    def claim_path(self, path: Path, *, skip_missing: bool = False) -> list[Source] | None:
        """The checkpoints an input path (a file, a prefix, an index) denotes, or
        None when it is not this format."""
        return None

    def scan_dir(self, path: Path) -> list[Source]:
        """The checkpoints directly in a directory."""
        return []

    # ---- remote inputs (``remote_reads``)
    def claim_url(self, fs, path: str) -> list[Source] | None:
        """``claim_path`` for an object on an fsspec filesystem (``path``: without
        its protocol); Sources carry full URLs."""
        return None

    def scan_url_dir(self, fs, path: str) -> list[Source]:
        """``scan_dir`` for a directory (prefix) on an fsspec filesystem."""
        return []

    # ---- outputs
    def is_output(self, path: str) -> bool:
        """Whether an output path's suffix means this format."""
        return False

    def is_output_given_inputs(self, path: str, input_formats) -> bool:
        """For a suffix two formats share (``.ckpt``): whether this format takes
        the output when the inputs are ``input_formats`` (asked only of a format
        among the inputs' formats, before any format's ``is_output``).  Default: never."""
        return False

    def can_store(self, dtype: str) -> bool:
        """Whether the format can store tensors of this canonical dtype."""
        return True

    def make_staging(self, output: str, *, sharded: bool, force: bool):
        """Capability ``staging``: where a file (or prefix) output is written
        before its commit, an object with ``path``, ``commit()``, ``discard()``
        and ``final_files``.  Default: one staged file beside the output."""
        from ema_cli.output import Staged, check_target

        check_target(output, force=force, is_dir=False)
        return Staged(output, is_dir=False, force=force)

    def directory_name(self, shards: int, newest: Source) -> str:
        """For a directory output: the name the writer is given inside it (``""``:
        the directory itself, for shard files)."""
        from ema_cli.errors import UsageError

        raise UsageError(f"{self.name} output cannot be a directory; give a file name")

    def loader_files(self, directory: str, newest: Source) -> tuple[list[str], list[str]]:
        """For a directory output from ``newest``: (files of the newest input's
        directory to copy beside the weights, names left out to warn about)."""
        return [], []

    def finish_directory(self, stage: str, name: str) -> None:
        """Complete a staged directory output after its writer closed."""

    # ---- shard files (``shard_files``)
    def shard_names(self, n: int) -> list[str]:
        raise NotImplementedError

    def open_shard(self, path: str, infos: list[TensorInfo], metadata: dict[str, str]) -> "Writer":
        """A writer of one output shard's file."""
        raise NotImplementedError

    def index_document(self, shard_infos: list[list[TensorInfo]], metadata: dict[str, str]) -> tuple[str, bytes]:
        """The index the commit writes after every shard is complete: (file name, bytes)."""
        raise NotImplementedError


def step_from_scalar(arr: np.ndarray) -> int | None:
    """An integer scalar (or 1-element) tensor's value, else None."""
    a = np.asarray(arr)
    if a.size != 1 or a.dtype.kind not in "iu":
        return None
    return int(a.reshape(-1)[0])


def load_weight_map_index(index: Path | str, what: str, text: str | bytes | None = None) -> dict:
    """A Hugging Face shard index (``model.safetensors.index.json``,
    ``pytorch_model.bin.index.json``): its JSON, with a ``weight_map`` object
    whose every value is a plain file name beside the index.  ``what`` names
    the kind of index in the errors; ``text``: its content, when read already
    (a remote index)."""
    try:
        doc = json.loads(Path(index).read_text() if text is None else text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmaError(f"not a readable {what}: {e}", path=str(index)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise EmaError(f"{what} has no 'weight_map' object", path=str(index))
    for k, v in doc["weight_map"].items():
        if not isinstance(v, str) or "/" in v or v in ("", ".", ".."):
            raise EmaError(f"index maps {k!r} to an invalid file name {v!r}", path=str(index))
    return doc
