"""``inspect``: what a checkpoint holds and what ema-avg would do with each tensor."""

from __future__ import annotations

import os
import re
import sys
import types
from collections import Counter

from ema_cli import formats, maps, names, notices, planning


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``vars/2`` before ``vars/10``."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in _DIGITS.split(name))


def inspect(inputs: list[str], *, include: list[str], exclude: list[str], suffix: str,
            options: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """One document per checkpoint, its tensors in natural name order.  Roles: ``shadow`` (named ``x/SUFFIX``),
    ``averaged`` (the averaged set ``average`` uses: for TF1 with a ``.meta``, its
    collections), ``copied`` (from the newest checkpoint)."""
    names.check_suffix(suffix)
    planning.compile_patterns(include, "--include")
    planning.compile_patterns(exclude, "--exclude")
    docs = []
    sources = formats.resolve_inputs(inputs, options)
    for w in sources.warnings:
        notices.warn(w)
    for src in sources:
        r = formats.open_reader(src)
        try:
            rows = []
            tensors = r.tensors()
            averaged = set(maps.averaged_names(r, suffix, include, exclude))
            for name, info in tensors.items():
                row = {"name": name, "dtype": info.dtype, "shape": list(info.shape), "nbytes": info.nbytes}
                if names.is_shadow(name, suffix):
                    row["role"] = "shadow"
                    row["shadow_of"] = names.original_name(name, suffix)
                else:
                    row["role"] = "averaged" if name in averaged else "copied"
                kind = r.role(info)
                row["kind"] = kind.kind  # parameter, buffer, optimizer, counter, other
                row["why"] = kind.why
                rows.append(row)
            rows.sort(key=lambda x: natural_key(x["name"]))
            step = r.step()
            step_from = "tensor"
            if step is None:
                step, step_from = planning.step_from_name(src.name_hint or src.path), "name"
            docs.append({
                "path": _abs(src.path), "format": src.format, "step": step, "step_from": step_from if step is not None else None,
                "suffix": suffix, "averaged_from": maps.averaged_from(r),
                "files": [_abs(f) for f in src.files], "metadata": r.metadata(), "structure": r.extras(), "tensors": rows,
                "totals": {"tensors": len(rows), "bytes": sum(x["nbytes"] for x in rows),
                           "roles": dict(Counter(x["role"] for x in rows))},
            })
        finally:
            r.close()
    return docs


class _CallableModule(types.ModuleType):
    """``ema_cli.inspect`` is this module (``ema_cli.inspect.inspect(inputs, ...)``:
    the documents the CLI prints) and, called, the API function:
    ``ema_cli.inspect(path)`` is :func:`ema_cli.api.inspect` (a list of ``TensorRow``)."""

    def __call__(self, path, **kwargs):
        from ema_cli.api import inspect as api_inspect

        return api_inspect(path, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def _abs(path: str) -> str:
    from ema_cli import storage

    return storage.absolute(path)
