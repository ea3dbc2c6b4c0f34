"""``inspect``: what a checkpoint holds and what ema-avg would do with each tensor."""

from __future__ import annotations

from collections import Counter

from ema_cli import formats, maps, names, notices, plan


def inspect(inputs: list[str], *, include: list[str], exclude: list[str], suffix: str,
            options: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """One document per checkpoint.  Roles: ``shadow`` (named ``x/SUFFIX``),
    ``averaged`` (the averaged set ``average`` uses: for TF1 with a ``.meta``, its
    collections), ``copied`` (from the newest checkpoint)."""
    names.check_suffix(suffix)
    plan.compile_patterns(include, "--include")
    plan.compile_patterns(exclude, "--exclude")
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
            step = r.step()
            step_from = "tensor"
            if step is None:
                step, step_from = plan.step_from_name(src.name_hint or src.path), "name"
            docs.append({
                "path": src.path, "format": src.format, "step": step, "step_from": step_from if step is not None else None,
                "suffix": suffix, "averaged_from": maps.averaged_from(r),
                "files": list(src.files), "metadata": r.metadata(), "structure": r.extras(), "tensors": rows,
                "totals": {"tensors": len(rows), "bytes": sum(x["nbytes"] for x in rows),
                           "roles": dict(Counter(x["role"] for x in rows))},
            })
        finally:
            r.close()
    return docs
