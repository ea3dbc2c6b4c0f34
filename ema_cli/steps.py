"""A checkpoint's training step from its file or directory name.

Used when the checkpoint holds no step counter.  Training tools name their
checkpoints in a few ways, and a name often holds other numbers too:

* labelled: ``step=300``, ``global_step=300`` (Lightning ``epoch=3-step=300-val_loss=0.35``),
  ``step_300``, ``iter_300``, ``iteration-300``, ``it300``, ``num_updates=300``;
* a checkpoint prefix: ``checkpoint-300`` (the HF Trainer), ``ckpt-300``,
  ``model.ckpt-300``, ``checkpoint_300.pt`` (fairseq);
* an epoch: ``epoch=3``, ``epoch_3`` (used when no step label is present);
* unlabelled: ``weights.03-0.35`` (Keras ``weights.{epoch:02d}-{val_loss:.2f}``).

Floats (``val_loss=0.35``, ``0.35``, ``1e-4``) are never steps.  When a name
holds several unlabelled integers, the first is used and :func:`parse` says so
(``note``), so ``plan`` can warn.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_SUFFIXES = re.compile(
    r"(\.safetensors\.index\.json|\.safetensors|\.weights\.json|\.weights\.h5|\.h5|\.hdf5|\.keras|\.ckpt|"
    r"\.index|\.meta|\.data-\d+-of-\d+|\.pth\.tar|\.pt|\.pth|\.bin|\.tar)$",
    re.I,
)
_SHARD = re.compile(r"[-_]\d{5}-of-\d{5}$")

# a label, then = / _ / - / nothing, then the number; the number must not continue as a float
_NUM = r"(?P<num>\d+)(?!\d)(?!\.\d)(?![eE][-+]?\d)"
_BOUNDARY = r"(?:^|(?<=[^A-Za-z0-9]))"

#: labels in order of preference: a training step beats a checkpoint counter beats an epoch
_LABELS: list[tuple[str, re.Pattern]] = [
    ("step", re.compile(_BOUNDARY + r"(?:global[_-]?step|num[_-]?updates|step|steps|iteration|iter|it|updates)"
                        r"\s*[=_-]?\s*" + _NUM, re.I)),
    ("checkpoint", re.compile(_BOUNDARY + r"(?:checkpoint|ckpt|model\.ckpt)[=_-]?" + _NUM, re.I)),
    ("epoch", re.compile(_BOUNDARY + r"epochs?\s*[=_-]?\s*" + _NUM, re.I)),
]
_FLOAT = re.compile(r"(?<![\d.])\d+\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+")
_INT = re.compile(r"\d+")


@dataclass(frozen=True)
class StepName:
    step: int | None
    label: str  # "step", "checkpoint", "epoch", "number" (unlabelled) or "" (none)
    note: str | None = None  # set when the choice was ambiguous


def stem(name: str) -> str:
    """The base name without checkpoint suffixes and shard counters."""
    base = os.path.basename(name.rstrip("/"))
    while True:
        stripped = _SUFFIXES.sub("", base)
        if stripped == base:
            break
        base = stripped
    return _SHARD.sub("", base)


def parse(name: str) -> StepName:
    """The step a checkpoint's name gives (see the module docstring)."""
    base = stem(name)
    for label, rx in _LABELS:
        found = [m for m in rx.finditer(base)]
        if found:
            return StepName(int(found[0].group("num")), label)
    rest = _FLOAT.sub(" ", base)
    nums = _INT.findall(rest)
    if not nums:
        return StepName(None, "")
    note = None
    if len(nums) > 1:
        note = f"{os.path.basename(name.rstrip('/'))}: several numbers and none labelled as the step; ordered by the first ({int(nums[0])})"
    return StepName(int(nums[0]), "number", note)


def step_from_name(name: str) -> int | None:
    return parse(name).step
