"""``inspect``: what a checkpoint holds and what ema-avg would do with each tensor."""

from __future__ import annotations

from collections import Counter

from ema_cli import engine, formats, names


def inspect(inputs: list[str], *, include: list[str], exclude: list[str], suffix: str) -> list[dict]:
    opts = engine.Options(include=include, exclude=exclude)
    inc = engine._compile(include, "--include")
    exc = engine._compile(exclude, "--exclude")
    docs = []
    for src in formats.resolve_inputs(inputs):
        r = formats.open_reader(src)
        try:
            rows = []
            tensors = r.tensors()
            for name, info in tensors.items():
                if names.is_shadow(name, suffix):
                    role = "shadow"
                elif engine._averaged(r, info, opts, inc, exc):
                    role = "averaged"
                else:
                    role = "copied"
                rows.append({"name": name, "dtype": info.dtype, "shape": list(info.shape),
                             "nbytes": info.nbytes, "role": role})
            step = r.step()
            step_from = "tensor"
            if step is None:
                step, step_from = engine.step_from_name(src.name_hint or src.path), "name"
            docs.append({
                "path": src.path, "format": src.format, "step": step, "step_from": step_from if step is not None else None,
                "files": list(src.files), "metadata": r.metadata(), "tensors": rows,
                "totals": {"tensors": len(rows), "bytes": sum(x["nbytes"] for x in rows),
                           "roles": dict(Counter(x["role"] for x in rows))},
            })
        finally:
            r.close()
    return docs
