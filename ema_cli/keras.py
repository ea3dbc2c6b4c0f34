"""A Keras callback that averages the checkpoints ``ModelCheckpoint`` wrote.

    ckpt = keras.callbacks.ModelCheckpoint("ckpts/ep{epoch:02d}.weights.h5", save_weights_only=True)
    avg = ema_cli.keras.AverageCheckpoints("ckpts", "avg.weights.h5", decay=0.9)
    model.fit(x, y, epochs=10, callbacks=[ckpt, avg])   # AverageCheckpoints after ModelCheckpoint
    model.load_weights("avg.weights.h5")

Needs Keras 3 (``pip install keras``); importing this module imports Keras.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import keras

from ema_cli import api


def _is_ema_avg_output(source) -> bool:
    """Whether a checkpoint was written by ema-avg (its metadata records the recipe)."""
    from ema_cli import formats

    try:
        r = formats.open_reader(source)
    except api.EmaError:
        return False
    try:
        return "ema_avg" in r.metadata()
    finally:
        r.close()


class AverageCheckpoints(keras.callbacks.Callback):
    """Average the checkpoints in ``directory`` into ``output``, at the end of
    training and, with ``every_n_epochs=N``, after every N-th epoch.

    Args:
        directory: where ``ModelCheckpoint`` writes (``.weights.h5``, ``.h5``,
            ``.keras``, ...): every checkpoint directly in it is an input, ordered
            by the step the file records (Keras 3: the optimizer's iteration
            count) or the epoch in its name (``ep03.weights.h5``); ``output``
            and other ema-avg outputs there (their metadata records the recipe)
            are never inputs.
        output: the averaged checkpoint (``avg.weights.h5`` loads with
            ``model.load_weights``; the format follows the suffix). Replaced at
            each update.
        decay: EMA decay over the checkpoints in order (None: the uniform mean).
        every_n_epochs: also average after every N-th epoch (None: only at the end).
        **average_kwargs: any other keyword of :func:`ema_cli.average`
            (``select=``, ``half_life=``, ``dtype=``, ``weights=``, ...).

    Attributes:
        result: the :class:`ema_cli.Result` of the last update (None before).

    Put it after ``ModelCheckpoint`` in ``callbacks``: Keras calls callbacks in
    order, so the epoch's checkpoint is on disk when this one runs.  Errors are
    raised as :class:`ema_cli.EmaError` (training stops); a directory without
    checkpoints yet is skipped with an :class:`ema_cli.EmaWarning`.
    """

    def __init__(self, directory: str | os.PathLike, output: str | os.PathLike, decay: float | None = None,
                 every_n_epochs: int | None = None, **average_kwargs: Any):
        super().__init__()
        if every_n_epochs is not None and every_n_epochs < 1:
            raise api.UsageError("every_n_epochs must be a positive integer")
        self.directory = os.fspath(directory)
        self.output = os.fspath(output)
        self.decay = decay
        self.every_n_epochs = every_n_epochs
        self.average_kwargs = average_kwargs
        self.result: api.Result | None = None

    def _inputs(self) -> list[str]:
        from ema_cli import formats

        directory = api.expand_path(self.directory)
        if not os.path.isdir(directory):
            return []
        out = os.path.realpath(api.expand_path(self.output))
        try:
            sources = formats.resolve_inputs([directory])
        except api.EmaError:  # no checkpoints in it (yet)
            return []
        keep = []
        for s in sources:
            files = {os.path.realpath(f) for f in (s.path, *s.files)}
            if out in files or any(f.startswith(out.rstrip(os.sep) + os.sep) for f in files):
                continue  # the output of an earlier update
            if _is_ema_avg_output(s):
                continue  # another average (a second callback on the same directory)
            keep.append(s.path)
        return keep

    def average(self) -> api.Result | None:
        """Average what ``directory`` holds now into ``output``; None if it holds nothing."""
        inputs = self._inputs()
        if not inputs:
            warnings.warn(f"{self.directory}: no checkpoints to average yet", api.EmaWarning, stacklevel=2)
            return None
        self.result = api.average(inputs, self.output, decay=self.decay, force=True, **self.average_kwargs)
        return self.result

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0:
            self.average()

    def on_train_end(self, logs=None) -> None:
        self.average()


__all__ = ["AverageCheckpoints"]
