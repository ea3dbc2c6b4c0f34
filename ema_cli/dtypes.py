"""Canonical dtype names shared by every format.

A dtype is named by a short string ("float32", "bfloat16", "float8_e4m3fn",
"int64", "bool", "string").  Formats translate their own codes to these names;
the engine only ever sees canonical names and the numpy dtypes from here.
"""

from __future__ import annotations

import numpy as np

# canonical names that only ml_dtypes gives numpy a type for.  ml_dtypes is
# imported on first use of one of them (``import ml_dtypes`` costs 0.5 s and
# more with ml_dtypes 0.7): averaging float32/float16/float64 never needs it,
# and the kernel handles bfloat16 through its uint16 bits (ema_cli/kernel.py).
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")

# canonical name -> numpy dtype (None for strings, which have no fixed width;
# the ml_dtypes names map to None until ml_dtypes is loaded, see to_numpy)
_NUMPY: dict[str, np.dtype | None] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    **dict.fromkeys(_ML_DTYPES),
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
#: the short names --dtype (and ``ema_cli.average(dtype=...)``) also accept
OUTPUT_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16",
                  "fp32": "float32", "float": "float32", "f32": "float32", "single": "float32",
                  "fp64": "float64", "double": "float64", "f64": "float64"}


def output_choice(name: str) -> str:
    """``--dtype``'s value in canonical form: ``bf16`` -> ``bfloat16``, ``fp16``/``half``
    -> ``float16``, ``fp32``/``float`` -> ``float32``, ``fp64``/``double`` -> ``float64``
    (case-insensitive); unknown names are returned unchanged (the plan refuses them)."""
    key = str(name).strip().lower()
    return OUTPUT_ALIASES.get(key, key if key in OUTPUT_CHOICES else name)

_BY_NUMPY = {dt: name for name, dt in _NUMPY.items() if dt is not None}
_ITEMSIZE = {**{name: dt.itemsize for dt, name in _BY_NUMPY.items()}, "bfloat16": 2,
             **{n: 1 for n in _ML_DTYPES if n != "bfloat16"}, "string": 0}
_ml_loaded = False


def _load_ml_dtypes() -> None:
    """Give the ml_dtypes names their numpy types (imports ml_dtypes, once)."""
    global _ml_loaded
    if _ml_loaded:
        return
    import ml_dtypes  # registers bfloat16 / float8 types with numpy

    for name in _ML_DTYPES:
        dt = np.dtype(getattr(ml_dtypes, name))
        _NUMPY[name] = dt
        _BY_NUMPY[dt] = name
    _ml_loaded = True


def known(name: str) -> bool:
    return name in _NUMPY


def to_numpy(name: str) -> np.dtype:
    dt = _NUMPY.get(name)
    if dt is None:
        if name not in _ML_DTYPES:
            raise KeyError(name)
        _load_ml_dtypes()
        dt = _NUMPY[name]
    return dt


def from_numpy(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    if dt.kind in "SUO":
        return "string"
    key = dt.newbyteorder("=") if dt.byteorder not in "=|" else dt
    name = _BY_NUMPY.get(key)
    if name is None and not _ml_loaded and key.name in _ML_DTYPES:
        _load_ml_dtypes()  # an ml_dtypes array: ml_dtypes is imported already
        name = _BY_NUMPY.get(key)
    if name is None:
        raise KeyError(str(dt))
    return name


def itemsize(name: str) -> int:
    return _ITEMSIZE.get(name, 0)


def is_float(name: str) -> bool:
    return name in FLOATING


# --------------------------------------------------------------------------- raw bits

#: canonical dtypes the engine carries as their raw bits, in a numpy integer type
#: of the same width (the *storage* dtype), wherever the reader and the writer
#: declare they can (``Reader.reads_bits``, ``Writer.writes_bits``): numpy has
#: no type of its own for them, and ml_dtypes' costs 0.5 s and more to import.
#: The kernel widens and rounds bfloat16 from its uint16 bits (ema_cli/kernel.py).
BITS: dict[str, np.dtype] = {"bfloat16": np.dtype(np.uint16)}


def storage_numpy(name: str) -> np.dtype:
    """The numpy dtype a tensor of canonical dtype ``name`` is carried in by the
    engine: uint16 for bfloat16 (its bits, no ml_dtypes), else ``to_numpy(name)``."""
    bits = BITS.get(name)
    return bits if bits is not None else to_numpy(name)


def is_bits(arr, name: str) -> bool:
    """Whether ``arr`` holds the raw bits of a ``name`` tensor (bfloat16 as uint16)."""
    bits = BITS.get(name)
    return bits is not None and np.asarray(arr).dtype == bits


def as_storage(arr, name: str) -> np.ndarray:
    """``arr`` (values or raw bits of a ``name`` tensor) in ``storage_numpy(name)``:
    a zero-copy view of an ml_dtypes bfloat16 array's bits; any other array is
    converted to ``name``'s values first (``np.asarray(arr, dtype=...)``)."""
    a = np.asarray(arr)
    bits = BITS.get(name)
    if bits is None:
        return np.asarray(a, dtype=to_numpy(name))
    if a.dtype == bits:
        return a
    if a.dtype.name == name:  # ml_dtypes' type: it is imported already
        return a.view(bits)
    return np.asarray(a, dtype=to_numpy(name)).view(bits)  # a value conversion (imports ml_dtypes)


def as_values(arr, name: str) -> np.ndarray:
    """``arr`` with ``name``'s own numpy type: raw bits viewed as ml_dtypes'
    bfloat16 without a copy (imports ml_dtypes); other arrays unchanged.  For
    code that computes on the values (``--tf-exact``) and formats that do not
    take raw bits."""
    a = np.asarray(arr)
    if is_bits(a, name):
        return a.view(to_numpy(name))
    return a


def widen(arr, name: str) -> np.ndarray:
    """The values of a ``name`` tensor (raw bits or values) as float64, exactly."""
    a = np.asarray(arr)
    if name in BITS:
        bits = a if a.dtype == BITS[name] else a.view(BITS[name])
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def all_finite(arr, name: str) -> bool:
    """Whether a ``name`` tensor (raw bits or values) holds no NaN or Inf: for
    bfloat16 bits, non-finite is an all-ones exponent, ``(bits & 0x7f80) == 0x7f80``."""
    a = np.asarray(arr)
    if name in BITS:
        bits = a if a.dtype == BITS[name] else a.view(BITS[name])
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    if a.dtype.kind not in "fc" and a.dtype.name not in _ML_DTYPES:
        return True
    return bool(np.isfinite(a).all())


def store_rounded(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src`` (src float64), correctly rounded to dst's dtype (ema_cli/kernel.py)."""
    from ema_cli import kernel

    kernel.store_rounded(src, dst)


def cast_rounded(src: np.ndarray, dtype_name: str, *, src_dtype: str | None = None,
                 storage: bool = False) -> np.ndarray:
    """``src`` correctly rounded to ``dtype_name``.  ``src_dtype``: src's canonical
    dtype when it may hold raw bits (a bfloat16 tensor as uint16, see ``BITS``);
    ``storage``: return the result in ``storage_numpy(dtype_name)`` (bfloat16 as
    its uint16 bits: no ml_dtypes), else in ``to_numpy(dtype_name)``."""
    from ema_cli import kernel

    src = np.asarray(src)
    if src_dtype is not None and is_bits(src, src_dtype):
        src = widen(src, src_dtype)
    out = np.empty(np.shape(src), dtype=storage_numpy(dtype_name) if storage else to_numpy(dtype_name))
    if src.dtype != np.float32 or dtype_name != "bfloat16":
        src = src.astype(np.float64)  # (float32 -> bfloat16 rounds from the float32 bits directly)
    kernel.store_rounded(src, out, dtype_name)
    return out


# the largest finite values of the types numpy knows, and of bfloat16 (0x7f7f), without ml_dtypes
_MAX_FINITE = {"float64": float(np.finfo(np.float64).max), "float32": float(np.finfo(np.float32).max),
               "float16": 65504.0, "bfloat16": float(np.uint32(0x7F7F0000).view(np.float32))}


def max_finite(name: str) -> float:
    """The largest finite value of a floating dtype (float16: 65504)."""
    top = _MAX_FINITE.get(name)
    if top is None:
        import ml_dtypes

        top = _MAX_FINITE[name] = float(ml_dtypes.finfo(to_numpy(name)).max)
    return top


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
