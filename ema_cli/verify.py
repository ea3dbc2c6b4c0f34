"""``--verify``: reopen the written output and check every tensor's name, dtype,
shape and checksum against what was computed (digests recorded during the run).

The engine runs it on the staged output, before the commit: a failed check
leaves nothing new at the output path."""

from __future__ import annotations

import time

from ema_cli import formats
from ema_cli.formats.base import Source
from ema_cli.execute import digest
from ema_cli.errors import EmaError


def _open(staged: str, out_format: str, options: str = ""):
    """A reader of the staged output (a hidden file keeps no format suffix: it is
    then opened as the output format directly).  A remote output is reopened
    from its staging prefix like any remote input (``options``: its storage
    options), so the check reads what the store holds."""
    source_options = (("storage_options", options),) if options not in ("", "{}") else ()
    try:
        srcs = formats.resolve_inputs([staged], source_options)
    except EmaError:
        srcs = None
    if srcs is None:
        return formats.open_reader(Source(out_format, staged, (staged,), options=source_options))
    if len(srcs) != 1:
        raise EmaError(f"verify: the output reads as {len(srcs)} checkpoints")
    return formats.open_reader(srcs[0])


def verify(plan, staged: str, out_format: str, checksums: dict[str, str], *, output: str, options: str = "") -> float:
    """Check the staged output at ``staged`` (errors name ``output``); the seconds it took."""
    t0 = time.perf_counter()
    r = _open(staged, out_format, options)
    try:
        have = r.tensors()
        for task in plan.tasks:
            info = have.get(task.out_name)
            if info is None:
                raise EmaError("verify: tensor missing from the output", path=output, tensor=task.out_name)
            if info.dtype != task.out_dtype or info.shape != task.info.shape:
                raise EmaError(f"verify: {info.dtype}{list(info.shape)} in the output, expected "
                               f"{task.out_dtype}{list(task.info.shape)}", path=output, tensor=task.out_name)
            if digest(r.read(task.out_name)) != checksums[task.out_name]:
                raise EmaError("verify: values differ from what was computed (nothing was written at the "
                               "output path)", path=output, tensor=task.out_name)
    finally:
        r.close()
    return time.perf_counter() - t0
