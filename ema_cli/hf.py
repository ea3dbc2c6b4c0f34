"""A ``transformers.TrainerCallback`` that averages the Trainer's checkpoints.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[ema_cli.hf.AverageCheckpointsCallback(decay=0.9)])
    trainer.train()
    model = AutoModel.from_pretrained(f"{args.output_dir}/averaged")

Needs transformers; importing this module imports it.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

from transformers import TrainerCallback

from ema_cli import api

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class AverageCheckpointsCallback(TrainerCallback):
    """At ``on_train_end``, average ``output_dir/checkpoint-*`` (every checkpoint the
    Trainer kept, in step order) into ``output_dir/averaged/``: the model's
    safetensors (sharded like the inputs when ``max_shard_size`` is given) plus
    the files a loader needs from the newest checkpoint (``config.json``,
    tokenizer files), so ``from_pretrained(output_dir/averaged)`` loads it.
    Optimizer, scheduler and RNG state are never inputs nor copied.

    Args:
        decay: EMA decay over the checkpoints (None: the uniform mean).
        output_subdir: the output directory's name inside ``output_dir``
            (or an absolute path).
        **average_kwargs: any other keyword of :func:`ema_cli.average`
            (``select=``, ``half_life=``, ``dtype=``, ``max_shard_size=``, ...).

    Attributes:
        result: the :class:`ema_cli.Result` (None before the end, or when only
            non-main processes ran).

    Only the main process (``state.is_world_process_zero``) writes.  The output
    replaces an earlier ema-avg output there; with ``save_total_limit`` only the
    checkpoints the Trainer kept are averaged.
    """

    def __init__(self, decay: float | None = None, output_subdir: str = "averaged", **average_kwargs: Any):
        self.decay = decay
        self.output_subdir = output_subdir
        self.average_kwargs = average_kwargs
        self.result: api.Result | None = None

    @staticmethod
    def checkpoints(output_dir: str) -> list[str]:
        """The ``checkpoint-N`` directories of ``output_dir``, by step."""
        try:
            entries = os.listdir(output_dir)
        except OSError:
            return []
        found = []
        for name in entries:
            m = _CHECKPOINT.match(name)
            if m and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(m.group(1)), os.path.join(output_dir, name)))
        return [p for _, p in sorted(found)]

    def on_train_end(self, args, state, control, **kwargs):
        if not getattr(state, "is_world_process_zero", True):
            return control
        ckpts = self.checkpoints(args.output_dir)
        if not ckpts:
            warnings.warn(f"{args.output_dir}: no checkpoint-* directories to average "
                          "(save_strategy='no'?)", api.EmaWarning, stacklevel=2)
            return control
        out = os.path.join(args.output_dir, self.output_subdir)
        self.result = api.average(ckpts, out.rstrip(os.sep) + os.sep, decay=self.decay, force=True,
                                  **self.average_kwargs)
        return control


__all__ = ["AverageCheckpointsCallback"]
