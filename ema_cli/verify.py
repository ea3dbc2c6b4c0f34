"""``--verify``: reopen the written output and check every tensor's name, dtype,
shape and checksum against what was computed (digests recorded during the run)."""

from __future__ import annotations

import time

from ema_cli import formats
from ema_cli.engine import digest
from ema_cli.errors import EmaError


def verify(result) -> float:
    t0 = time.perf_counter()
    plan = result.plan
    srcs = formats.resolve_inputs([result.output])
    if len(srcs) != 1:
        raise EmaError(f"verify: the output reads as {len(srcs)} checkpoints", path=result.output)
    r = formats.open_reader(srcs[0])
    try:
        have = r.tensors()
        for task in plan.tasks:
            info = have.get(task.out_name)
            if info is None:
                raise EmaError("verify: tensor missing from the output", path=result.output, tensor=task.out_name)
            if info.dtype != task.out_dtype or info.shape != task.info.shape:
                raise EmaError(f"verify: {info.dtype}{list(info.shape)} in the output, expected "
                               f"{task.out_dtype}{list(task.info.shape)}", path=result.output, tensor=task.out_name)
            if digest(r.read(task.out_name)) != result.checksums[task.out_name]:
                raise EmaError("verify: values differ from what was computed", path=result.output, tensor=task.out_name)
    finally:
        r.close()
    return time.perf_counter() - t0
