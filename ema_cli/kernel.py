"""The numeric kernel: the float64 blocked weighted sum and the one rounding.

Every averaged tensor goes through here.  ``block_sum`` computes
``round(sum_k w_k x_k)`` in cache-sized blocks: the accumulator is float64,
each product and each sum is rounded in float64 (no FMA), in checkpoint order,
and the result is rounded once to the output dtype (``store_rounded``).  The
uniform mean is ``round(sum_k x_k / N)``: the float64 sum, then one division
(what timm and t2t compute), so ties round as the correctly rounded sum/N.
``tf_exact_replay`` is the other kernel: TensorFlow's float32 EMA recurrence,
replayed bit for bit (``--tf-exact``).

bfloat16 needs no ml_dtypes here: a bf16 value is the top half of a float32,
so it widens exactly with a ``uint16 -> uint32`` shift viewed as float32, and
rounds to bf16 with integer operations on the float32 bits.  Arrays of
ml_dtypes' bfloat16 and raw uint16 bits (``in_dtype="bfloat16"``) are both
accepted: the kernel only ever looks at their uint16 view.

The bfloat16 path runs in ``ema_cli._ckernel`` (C, built with the package;
see ``_C`` below) where it is built: widening and the multiply-add fused into
one pass per input and block, the rounding into one pass per block, the same
operations in the same order, so the bits equal the numpy path's (the tests
run both).  Measured on one 4096x11008 tensor, 6 bf16 inputs, mean, one
thread (2-core Xeon VM): numpy path 0.61-0.70 s, C path 0.14 s.  Why C, and
not a JIT (numba) or numexpr: numba, tried on this loop (numba 0.68, numpy
2.4, 6 x 4096x11008 bf16, mean, one thread): its import takes 0.4 s and
loading the cached compiled kernel 0.9 s more in every process (2.7 s to
compile it the first time), and its fused loop ran at 0.49 s; not installed
with the base package either.  numexpr cannot reinterpret bits (the bf16
widening and rounding) and would need the same float64 copies.  Cython would
be a build dependency for two loops that touch no Python object.  The C
module needs only setuptools and a C compiler at install time; without them
(or with EMA_AVG_PURE_NUMPY=1) the numpy path below runs.

The numpy path: the block loop does two passes per input and block for the
mean (the widening shift, then a float64 add that converts the float32 view
in numpy's small casting buffers) and one more for weighted sums; the blocks
(64K elements) stay in L2, and every buffer is preallocated and written with
``out=``.  The rounding to bf16 is branch-free integer work on the float32
bits (``_f64_to_bf16``).  Threads (``--threads``, default: the cores) run
tensors in parallel: numpy and the C module release the GIL in every pass.
All scratch memory is per thread and reused from block to block and tensor
to tensor: nothing is allocated per block.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ema_cli import dtypes
from ema_cli.errors import EmaError

BLOCK = 1 << 16  # elements per float64 accumulation block (512 KiB; two of them stay in L2)
CHUNK = 1 << 20  # bytes of rounded output a thread stages before handing them to a streaming writer
SMALL = 4096  # tensors of at most this many elements are summed in one go


def _load_c():
    """The fused bf16 kernel (ema_cli/_ckernel.c), or None: not built (no C
    compiler when the package was installed) or EMA_AVG_PURE_NUMPY=1."""
    if os.environ.get("EMA_AVG_PURE_NUMPY"):
        return None
    try:
        from ema_cli import _ckernel
    except ImportError:
        return None
    return _ckernel


_C = _load_c()  # tests set it to None to run the numpy path
_scratch = threading.local()  # per-thread buffers, reused from block to block and tensor to tensor


class _Scratch:
    """One thread's block buffers (at least ``n`` elements each)."""

    __slots__ = ("n", "acc", "tmp", "fin", "u32", "r32", "f32", "mask", "back", "quot")

    def __init__(self, n: int):
        self.n = n
        self.acc = np.empty(n)  # float64 accumulator
        self.tmp = np.empty(n)  # float64 product
        self.fin = np.empty(n, dtype=np.bool_)
        self.u32 = np.empty(n, dtype=np.uint32)  # widened bf16 (viewed as float32)
        self.r32 = np.empty(n, dtype=np.uint32)  # rounding: integer work
        self.f32 = np.empty(n, dtype=np.float32)  # rounding: float64 -> float32
        self.mask = np.empty(n, dtype=np.bool_)
        self.back = np.empty(n)  # rounding to bf16: the float32 value widened back
        self.quot = np.empty(n)  # rounding to bf16: the float64 quotient of the mean


def scratch(n: int) -> _Scratch:
    s = getattr(_scratch, "bufs", None)
    if s is None or s.n < n:
        s = _scratch.bufs = _Scratch(max(n, BLOCK))
    return s


def stage_buffer(dtype: np.dtype, block: int) -> np.ndarray:
    """This thread's staging buffer for rounded output: a whole number of blocks, about CHUNK bytes."""
    stages = _scratch.__dict__.setdefault("stages", {})
    size = max(1, CHUNK // (dtype.itemsize * block)) * block
    buf = stages.get(dtype)
    if buf is None or buf.size < size:
        buf = stages[dtype] = np.empty(size, dtype=dtype)
    return buf[:size]


# --------------------------------------------------------------------------- bfloat16 bits


def _is_bf16(a: np.ndarray, name: str | None = None) -> bool:
    return name == "bfloat16" or a.dtype.name == "bfloat16"


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """The uint16 bits of a bfloat16 array (ml_dtypes' type or raw uint16), no copy."""
    return a if a.dtype == np.uint16 else a.view(np.uint16)


def widen_bf16(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly: the bits shifted to the top half."""
    if out is None:
        out = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out.view(np.float32)


def _rne(b: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """float32 bits ``b`` (uint32) -> the top 16 bits rounded to nearest, ties to
    even (5 integer passes, no branch, no indexing): ``(b + 0x7FFF + lsb) >> 16``
    where lsb is the last kept bit.  Overflow gives inf; NaNs with large payloads
    may wrap (``_quiet_nans`` redoes them)."""
    np.right_shift(b, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, b, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.right_shift(tmp, 16, out=out, casting="unsafe")


def _quiet_nans(b: np.ndarray, out: np.ndarray, tmp: np.ndarray, mask: np.ndarray) -> None:
    """NaNs stay NaN (their top bits, made quiet), whatever the rounding did to them."""
    np.bitwise_and(b, 0x7FFFFFFF, out=tmp)
    np.greater(tmp, 0x7F800000, out=mask)
    if mask.any():
        np.right_shift(b, 16, out=tmp)
        np.bitwise_or(tmp, 0x0040, out=tmp)
        np.copyto(out, tmp, casting="unsafe", where=mask)


def f32_bits_to_bf16(b: np.ndarray, out: np.ndarray, tmp: np.ndarray, mask: np.ndarray, nan: bool = True) -> None:
    """float32 bits ``b`` (uint32) -> bfloat16 bits ``out`` (uint16), round to
    nearest, ties to even.  Overflow gives inf (as IEEE rounding does); NaNs
    stay NaN, made quiet (``nan=False``: the caller knows there is none).
    ``tmp`` (uint32) and ``mask`` (bool) are scratch of the same size."""
    _rne(b, out, tmp)
    if nan:
        _quiet_nans(b, out, tmp, mask)


def _f64_to_bf16(a: np.ndarray, out: np.ndarray, s: _Scratch, nan: bool, divisor: int = 0) -> None:
    """float64 ``a`` (or ``a / divisor``, rounded in float64) -> bfloat16 bits,
    one correct rounding (nearest, ties to even).

    Rounding to float32 first (numpy's cast: correct, nearest-even) and then to
    bf16 would round twice: wrong where the float32 value lands exactly on a
    bf16 tie (low 16 bits 0x8000), which for averages of bf16 values is common
    (about 6% of the elements of a 6-checkpoint mean).  So the float32 value is
    made the float64 value rounded to odd: where the cast was inexact, step back
    toward zero if it rounded away (the float64 bits, compared as unsigned
    integers with the same sign, say which), and set the last bit.  Rounding to
    odd with at least 2 extra bits, then to nearest even, is one correct
    rounding (also on float32's subnormal grid, 16 bits finer than bf16's).
    Ten branch-free passes over the block, no indexing."""
    m = a.size
    y, back, r, k = s.f32[:m], s.back[:m], s.r32[:m], s.mask[:m]
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32's range: inf, the correct rounding too
        if divisor:
            x = s.quot[:m]
            np.divide(a, divisor, out=x)  # the float64 quotient (compared below, so kept)
        else:
            x = a
        np.copyto(y, x, casting="same_kind")
    np.copyto(back, y)
    b, xb, bb = y.view(np.uint32), x.view(np.uint64), back.view(np.uint64)
    np.less(xb, bb, out=k)  # |y| > |x|: the cast rounded away from zero
    np.subtract(b, k, out=b, casting="unsafe")
    np.not_equal(xb, bb, out=k)  # inexact: the sticky bit
    np.bitwise_or(b, k, out=b, casting="unsafe")
    _rne(b, out, r)
    if nan:
        np.isnan(x, out=k)
        if k.any():  # a NaN: the float32 cast's top bits, made quiet (what the C kernel writes)
            with np.errstate(invalid="ignore"):
                q = (x[k].astype(np.float32).view(np.uint32) >> 16) | 0x0040
            out[k] = q


def _f64_to_f32_round_to_odd(a: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: truncate, then set the last bit when inexact.

    Rounding to odd at float32 precision followed by round-to-nearest-even to a
    format with at most 22 significand bits equals one correct rounding (used
    for the float8 types, through ml_dtypes' float32 casts)."""
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


def store_rounded(src: np.ndarray, dst: np.ndarray, name: str | None = None, finite: bool = False,
                  divisor: int = 0) -> None:
    """``dst[...] = src``, correctly rounded (nearest, ties to even) to dst's dtype.

    ``src`` is float64 (or float32 for a bf16 target); ``name`` the canonical
    dtype of ``dst`` when dst holds raw bits (bfloat16 as uint16); ``finite``:
    the caller checked that src holds no NaN (skips the NaN pass).  Values
    beyond the dtype's range round to inf (``Narrowing`` then decides).  No
    allocation for float64/32/16 and bfloat16 targets of up to a block.
    ``divisor``: store ``src / divisor`` (the quotient rounded in float64, then
    to the dtype, without a pass of its own where the dtype allows)."""
    if name is None:
        name = "bfloat16" if dst.dtype.name == "bfloat16" else dtypes.from_numpy(dst.dtype)
    if name == "bfloat16":
        out = bf16_bits(dst).reshape(-1)
        flat = src.reshape(-1)
        if flat.dtype == np.float32:
            s = scratch(min(flat.size, BLOCK))
            for b0 in range(0, flat.size, s.n):  # (cast_rounded of a large array: in blocks)
                b1 = min(b0 + s.n, flat.size)
                m = b1 - b0
                f32_bits_to_bf16(flat[b0:b1].view(np.uint32), out[b0:b1], s.r32[:m], s.mask[:m], not finite)
            return
        flat = flat.astype(np.float64, copy=False)
        if _C is not None and flat.flags.c_contiguous and out.flags.c_contiguous:
            _C.f64_to_bf16(flat, out, divisor, not finite)
            return
        s = scratch(min(flat.size, BLOCK))
        for b0 in range(0, flat.size, s.n):
            b1 = min(b0 + s.n, flat.size)
            _f64_to_bf16(flat[b0:b1], out[b0:b1], s, not finite, divisor)
        return
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond the dtype's range round to inf
        if divisor:
            if name in _ROUND_VIA_ODD:
                src = src / divisor
            else:
                np.divide(src, divisor, out=dst, casting="unsafe")  # float64 quotient, one cast
                return
        if name in _ROUND_VIA_ODD:
            dst[...] = _f64_to_f32_round_to_odd(np.asarray(src, dtype=np.float64)).astype(dst.dtype)
        else:
            # numpy's float64 -> float32 and float64 -> float16 casts are correctly rounded
            # (tests/test_kernel.py checks float16 against exact rationals)
            np.copyto(dst, src, casting="unsafe")


# ml_dtypes converts float64 to float8 through float32: two roundings.  These
# targets go through round-to-odd instead, so a float64 accumulator is rounded
# to them exactly once.
_ROUND_VIA_ODD = frozenset(n for n in dtypes.FLOATING if n not in ("float64", "float32", "float16", "bfloat16"))


def isinf_out(o: np.ndarray, name: str) -> np.ndarray:
    if name == "bfloat16":
        return (bf16_bits(o) & 0x7FFF) == 0x7F80
    return np.isinf(o)


# --------------------------------------------------------------------------- overflow


class Narrowing:
    """How ``block_sum`` treats sums beyond the output dtype's range."""

    __slots__ = ("name", "dtype", "limit", "saturate")

    def __init__(self, name: str, dtype: str, saturate: bool):
        self.name, self.dtype, self.saturate = name, dtype, saturate
        self.limit = dtypes.max_finite(dtype)

    def may_overflow(self, a: np.ndarray) -> bool:
        """Whether the float64 block ``a`` may round beyond the range (cheap, no allocation)."""
        with np.errstate(invalid="ignore"):
            return not (np.maximum.reduce(a) <= self.limit and np.minimum.reduce(a) >= -self.limit)

    def fix(self, a: np.ndarray, out: np.ndarray) -> None:
        """``out`` (rounded from the float64 block ``a``) may hold inf: where ``a``
        is finite that is an overflow: an error, or with --saturate the largest
        finite value of the dtype, with its sign (an inf or NaN in ``a`` itself,
        averaged with --allow-nonfinite, stays as it is)."""
        with np.errstate(invalid="ignore"):
            over = isinf_out(out, self.dtype) & np.isfinite(a)
        if not over.any():
            return
        if not self.saturate:
            vals = a[over]
            worst = float(vals[np.argmax(np.abs(vals))])
            raise EmaError(f"the average reaches {worst:.3g}, beyond {self.dtype}'s largest finite value "
                           f"{self.limit:.6g}: it would be written as inf (use a wider --dtype, or --saturate "
                           f"to write {self.limit:.6g} instead)", tensor=self.name)
        clipped = np.where(over, np.clip(a, -self.limit, self.limit), a)
        store_rounded(clipped, out, self.dtype)


def narrowing(out_name: str, out_dtype: str, in_dtype: str, weights, saturate: bool, cache: dict | None = None):
    """The overflow guard for a tensor, or None when its sum cannot overflow the
    output dtype (the normal path: no extra work at all)."""
    key = (out_dtype, in_dtype)
    hit = None if cache is None else cache.get(key)
    if hit is None:
        hit = dtypes.can_overflow(out_dtype, [in_dtype], weights)
        if cache is not None:
            cache[key] = hit
    return Narrowing(out_name, out_dtype, saturate) if hit else None


# --------------------------------------------------------------------------- the weighted sum


def uniform(weights) -> int:
    """N when the weights are the uniform mean's (all equal to 1/N), else 0."""
    n = len(weights)
    if n == 0:
        return 0
    w0 = weights[0]
    if any(w != w0 for w in weights):
        return 0
    return n if w0 == 1.0 / n else 0


_NATIVE = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16))


def _all_finite(a: np.ndarray, f: np.ndarray) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(a)):  # one pass, no allocation: finite sum => finite elements
            return True
    return bool(np.isfinite(a, out=f).all())  # an inf/NaN, or a sum overflowing: look closely


def _c_sum(a: np.ndarray, blocks, weights, count: int) -> bool:
    """The C kernel's sum of one block of bf16 bits into ``a``; False where a block
    is not a contiguous buffer (the caller then takes the numpy path)."""
    try:
        _C.bf16_sum(a, blocks, weights, bool(count))
    except (BufferError, TypeError, ValueError):
        return False
    return True


def block_sum(srcs, weights, out_flat: np.ndarray, check: bool, emit=None, narrow: Narrowing | None = None,
              in_dtype: str | None = None, out_dtype: str | None = None):
    """out = round(sum_k w_k x_k), float64 accumulation in blocks, rounded once.

    Returns the start of the first block whose sum is not finite (when
    ``check``), else None.  Without ``emit``, ``out_flat`` is the whole output
    (flat).  With ``emit``, it is a staging buffer (a whole number of blocks):
    each time it is full, and at the end, ``emit(start, part)`` receives the
    rounded elements ``[start, start + part.size)``, so that memory does not
    grow with the tensor.  The sum runs in checkpoint order, so it equals a
    float64 reference computed the same way bit for bit:
    ``acc = float64(x_0) * w_0``, then ``acc += float64(x_k) * w_k``, every
    product and every sum rounded in float64 (no FMA), then one rounding to the
    output dtype.  For the uniform mean (every weight 1/N) it is
    ``acc = x_0 + x_1 + ...`` in float64, then ``acc / N``: the correctly
    rounded quotient of the float64 sum.

    ``in_dtype``/``out_dtype``: canonical dtypes when the arrays hold raw bits
    (bfloat16 as uint16); by default read from the arrays."""
    n = srcs[0].size
    if n == 0:
        return None
    out_name = out_dtype or ("bfloat16" if out_flat.dtype.name == "bfloat16" else dtypes.from_numpy(out_flat.dtype))
    bf16_in = _is_bf16(srcs[0], in_dtype)
    if bf16_in:
        srcs = [bf16_bits(x) for x in srcs]
    # the C kernel takes contiguous buffers: mapped arrays, and the blocks that remote
    # readers' range arrays return (anything else takes the numpy path below)
    fused = bf16_in and _C is not None and all(
        x.ndim == 1 and x.flags.c_contiguous for x in srcs if isinstance(x, np.ndarray))
    count = uniform(weights)
    block = min(n, BLOCK)
    s = scratch(block)
    acc, tmp, fin, u32 = s.acc, s.tmp, s.fin, s.u32
    copyto, multiply, add = np.copyto, np.multiply, np.add
    f64 = [x.dtype == np.float64 for x in srcs]
    staged = 0  # with emit: output index of out_flat[0]
    terms = list(zip(srcs, weights, f64))
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        m = b1 - b0
        a, t = acc[:m], tmp[:m]
        if fused:  # False from here on if a block is no contiguous buffer
            fused = _c_sum(a, [x[b0:b1] for x in srcs], weights, count)
        if fused:
            pass  # summed by the C kernel
        elif bf16_in:
            w32 = u32[:m]
            v = w32.view(np.float32)
            for k, (x, w, _) in enumerate(terms):
                np.left_shift(x[b0:b1], 16, out=w32, dtype=np.uint32)  # bf16 -> float32, exact
                if count:
                    if k == 0:
                        copyto(a, v)
                    else:
                        add(a, v, out=a)  # float32 converted to float64 in numpy's cast buffer, exact
                elif k == 0:
                    multiply(v, w, out=a, dtype=np.float64)
                else:
                    multiply(v, w, out=t, dtype=np.float64)
                    add(a, t, out=a)
        else:
            for k, (x, w, is64) in enumerate(terms):
                xb = x[b0:b1]
                if count:
                    if k == 0:
                        copyto(a, xb)  # exact widening
                    elif x.dtype in _NATIVE:
                        add(a, xb, out=a, dtype=np.float64)  # converted in numpy's cast buffer, exact
                    else:
                        copyto(t, xb)  # ml_dtypes types: their own exact cast
                        add(a, t, out=a)
                    continue
                if is64:
                    multiply(xb, w, out=a if k == 0 else t)
                else:
                    dst = a if k == 0 else t
                    copyto(dst, xb)  # exact widening (float32/16, ml_dtypes types)
                    multiply(dst, w, out=dst)
                if k:
                    add(a, t, out=a)
        fold = count if narrow is None else 0  # the division, done by the store (one pass less)
        if count and not fold:
            np.divide(a, count, out=a)
        # (the uniform mean checks the float64 sum: finite exactly when its quotient is, except
        # for float64 inputs so large that N of them overflow, reported as an overflow)
        if check and not _all_finite(a, fin[:m]):
            return b0
        if emit is None:
            o = out_flat[b0:b1]
        else:
            if b1 - staged > out_flat.size:
                emit(staged, out_flat[: b0 - staged])
                staged = b0
            o = out_flat[b0 - staged : b1 - staged]
        store_rounded(a, o, out_name, finite=check, divisor=fold)
        if narrow is not None and narrow.may_overflow(a):
            narrow.fix(a, o)
    if emit is not None:
        emit(staged, out_flat[: n - staged])
    return None


# --------------------------------------------------------------------------- TensorFlow's recurrence


def tf_exact_replay(arrs, steps, decay: float, num_updates: bool, out: np.ndarray, check: bool,
                    narrow: Narrowing | None = None):
    """``--tf-exact``: TensorFlow's ExponentialMovingAverage recurrence in the
    variables' own dtype (``schedule.tf_replay``), not a float64 sum.  Returns 0
    when the result is not finite (and ``check``), else None."""
    from ema_cli import schedule

    replay = np.asarray(schedule.tf_replay(arrs, steps, decay, num_updates))
    out[...] = replay
    if check and not np.isfinite(replay).all():
        return 0
    if narrow is not None and np.isinf(out).any():
        narrow.fix(replay.astype(np.float64).reshape(out.shape), out)
    return None
