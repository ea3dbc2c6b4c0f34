"""Canonical dtype names shared by every format.

A dtype is named by a short string ("float32", "bfloat16", "float8_e4m3fn",
"int64", "bool", "string").  Formats translate their own codes to these names;
the engine only ever sees canonical names and the numpy dtypes from here.
"""

from __future__ import annotations

import ml_dtypes  # registers bfloat16 / float8 types with numpy
import numpy as np

# canonical name -> numpy dtype (None for strings, which have no fixed width)
_NUMPY: dict[str, np.dtype | None] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "string": None,
}

#: floating dtypes that are averaged by default (NOTES.md: f16, bf16, f32, f64)
AVERAGED_BY_DEFAULT = frozenset({"float64", "float32", "float16", "bfloat16"})
#: every floating dtype (float8 variants are copied unless --dtype asks otherwise)
FLOATING = AVERAGED_BY_DEFAULT | frozenset(
    {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}
)
#: dtypes --dtype may convert to
OUTPUT_CHOICES = ("keep", "float32", "float16", "bfloat16", "float64")

_BY_NUMPY = {dt: name for name, dt in _NUMPY.items() if dt is not None}


def known(name: str) -> bool:
    return name in _NUMPY


def to_numpy(name: str) -> np.dtype:
    dt = _NUMPY.get(name)
    if dt is None:
        raise KeyError(name)
    return dt


def from_numpy(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    if dt.kind in "SUO":
        return "string"
    try:
        return _BY_NUMPY[dt.newbyteorder("=") if dt.byteorder not in "=|" else dt]
    except KeyError:
        raise KeyError(str(dt)) from None


def itemsize(name: str) -> int:
    dt = _NUMPY.get(name)
    return 0 if dt is None else dt.itemsize


def is_float(name: str) -> bool:
    return name in FLOATING


def _f64_to_f32_round_to_odd(a: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: truncate, then set the last bit when inexact.

    Rounding to odd at float32 precision followed by round-to-nearest-even to a
    format with at most 22 significand bits equals one correct rounding."""
    with np.errstate(over="ignore"):  # overflow to inf is the correct rounding there
        y = a.astype(np.float32)
    back = y.astype(np.float64)
    with np.errstate(invalid="ignore"):
        inexact = (back != a) & np.isfinite(a)
        over = np.abs(back) > np.abs(a)
    bits = y.view(np.uint32)
    bits -= (inexact & over).astype(np.uint32)  # one step toward zero (inf -> max)
    bits |= inexact.astype(np.uint32)
    return y


# ml_dtypes converts float64 to bfloat16/float8 through float32: two roundings.
# These targets go through round-to-odd instead, so a float64 accumulator is
# rounded to them exactly once.
_ROUND_VIA_ODD = frozenset(n for n in FLOATING if n not in ("float64", "float32", "float16"))


def store_rounded(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src`` (src float64), correctly rounded to dst's dtype."""
    name = from_numpy(dst.dtype)
    with np.errstate(over="ignore"):  # values beyond the dtype's range round to inf
        if name in _ROUND_VIA_ODD:
            dst[...] = _f64_to_f32_round_to_odd(src).astype(dst.dtype)
        else:
            dst[...] = src


def cast_rounded(src: np.ndarray, dtype_name: str) -> np.ndarray:
    out = np.empty(np.shape(src), dtype=to_numpy(dtype_name))
    store_rounded(np.asarray(src, dtype=np.float64), out)
    return out


def max_finite(name: str) -> float:
    """The largest finite value of a floating dtype (float16: 65504)."""
    return float(ml_dtypes.finfo(to_numpy(name)).max)


def can_overflow(out_name: str, in_names, weights) -> bool:
    """Whether rounding a weighted sum of ``in_names`` tensors to ``out_name`` can
    give inf from finite inputs: the output's range is narrower than an input's
    (float32 -> float16, float32 -> bfloat16, bfloat16 -> float16), or the
    weights can amplify (sum of |w| above 1: post-hoc EMA, negative weights)."""
    if out_name == "float64":
        return False
    top = max_finite(out_name)
    if any(is_float(n) and max_finite(n) > top for n in in_names):
        return True
    return float(np.abs(np.asarray(weights, dtype=np.float64)).sum()) > 1.0 + 1e-9
