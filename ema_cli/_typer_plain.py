"""Plain-type coercion for typer, without pydantic (start-up time).

typer 0.29 and newer coerce every non-bool parameter of the command being run
through a pydantic ``TypeAdapter``: importing pydantic and building the
adapters costs 0.15-0.3 s on every ``ema-avg`` run, most of the start-up
budget of a whole small average (0.35 s, issue 15).  ema-avg's parameters
are only ``bool``, ``str``, ``int``, ``float``, ``Optional`` of those and
``List[str]``, which need no schema library: for exactly those annotations
(and no ``parser=``, ``min``/``max`` or other constraint) this module returns
a coercion of its own; every other parameter still goes to typer's.

It hooks one internal function (``typer.core.build_runtime_param``).  When a
typer release no longer has it, ``install`` does nothing and typer's own
coercion runs: the CLI behaves the same, only slower to start
(``tests/test_kernel.py`` checks that a CLI average leaves pydantic
unimported, so such a release is noticed).  The messages are pydantic's own, so the CLI
prints the same ``error:`` lines either way.
"""

from __future__ import annotations

import re
from typing import List, Union, get_args, get_origin

_INT = "Input should be a valid integer, unable to parse string as an integer"
_FLOAT = "Input should be a valid number, unable to parse string as a number"
_INT_RE = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")  # pydantic's lax int: "2.0" is 2, "2.5" is not


def _to_int(value):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(_INT)
    if isinstance(value, int):
        return value
    s = value.strip()
    if not _INT_RE.fullmatch(s):
        raise ValueError(_INT)
    return int(s.split(".")[0])


def _to_float(value):
    if isinstance(value, bool):
        raise ValueError(_FLOAT)
    if isinstance(value, (int, float)):
        return float(value)
    # ASCII only (Python's float() also reads other scripts' digits); pydantic reads
    # underscores only where no whitespace surrounds the number
    if not isinstance(value, str) or not value.isascii() or ("_" in value and value != value.strip()):
        raise ValueError(_FLOAT)
    try:
        return float(value.strip())
    except ValueError:
        raise ValueError(_FLOAT) from None


def _to_str(value):
    if not isinstance(value, str):
        raise ValueError("Input should be a valid string")
    return value


_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))


def _to_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if not v:
            return False  # (as typer's coercion has it)
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise ValueError("Input should be a valid boolean, unable to interpret input")


_LEAVES = {str: _to_str, int: _to_int, float: _to_float, bool: _to_bool}


def _plain(annotation):
    """(leaf coercion, is_list) for the plain annotations, else None."""
    origin = get_origin(annotation)
    if origin is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1 or len(get_args(annotation)) != 2:
            return None
        return _plain(args[0])
    if origin in (list, List):
        (leaf,) = get_args(annotation) or (None,)
        fn = _LEAVES.get(leaf)
        return (fn, True) if fn is not None else None
    fn = _LEAVES.get(annotation)
    return (fn, False) if fn is not None else None


def _constrained(info) -> bool:
    return any(getattr(info, attr, None) is not None for attr in ("parser", "min", "max"))


def install() -> bool:
    """Hook typer's coercion for plain types; False (typer's own) when its internals differ."""
    try:
        from typer import core
        from typer._click.exceptions import BadParameter
        from typer._coercion import RuntimeParam
    except ImportError:
        return False
    original = getattr(core, "build_runtime_param", None)
    if original is None or getattr(original, "_ema_plain", False):
        return original is not None

    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class PlainRuntimeParam(RuntimeParam):
        """Coercion of bool/str/int/float (and lists of them) without pydantic."""

        leaf: object = None  # (the coercion, list or not: ``_plain``, found once)

        def _coerce_value(self, value, param, ctx):
            fn, many = self.leaf
            try:
                if many:
                    items = value if isinstance(value, (list, tuple)) else [value]
                    return [fn(v) for v in items]
                return fn(value)
            except ValueError as e:
                raise BadParameter(str(e), ctx=ctx, param=param) from None

    def build_runtime_param(descriptor):
        leaf = None if descriptor.file_annotation is not None or _constrained(descriptor.parameter_info) \
            else _plain(descriptor.annotation)
        if leaf is not None:
            return PlainRuntimeParam(parameter_info=descriptor.parameter_info, annotation=descriptor.annotation,
                                     leaf=leaf)
        return original(descriptor)

    build_runtime_param._ema_plain = True
    core.build_runtime_param = build_runtime_param
    return True


__all__ = ["install"]
