/* ema_cli._ckernel: the bfloat16 block kernel, fused (widen + multiply-add in
 * one pass per input, and the one rounding in one pass).
 *
 * The pure-numpy kernel (ema_cli/kernel.py) computes the same values bit for
 * bit; this module only makes the bfloat16 path cheaper, and ema-avg runs
 * without it (a machine with no C compiler, EMA_AVG_PURE_NUMPY=1).  Why C
 * through setuptools' Extension and the buffer protocol (no numpy headers, no
 * build dependency) rather than numba, numexpr or Cython: numba costs 1.3 s of
 * import and cache loading in every process and is not in the base package;
 * numexpr cannot reinterpret bits (the widening and the rounding stay numpy
 * passes); Cython would be a build dependency for two loops that touch no
 * Python object.  See ema_cli/kernel.py for the measurements.
 *
 * Numerics (the same as kernel.py, checked by tests/test_kernel.py and
 * tests/test_bf16_bits.py against the numpy path and exact rationals):
 *  - a bfloat16 value is the top half of a float32: widened exactly with a shift;
 *  - every product and every sum is rounded in float64, in checkpoint order:
 *    built with -ffp-contract=off, so no FMA is ever formed;
 *  - the float64 value (or its float64 quotient by N) is rounded to bfloat16
 *    once: cast to float32 (round to nearest even), made the value rounded to
 *    odd (step toward zero where the cast rounded away, set the last bit where
 *    it was inexact), then rounded to nearest even on the top 16 bits;
 *  - a NaN stays a NaN of the same sign, made quiet: the float32 cast's top bits
 *    with the quiet bit set.  Of several NaNs summed in one element, which one
 *    survives is not defined (the compiler may put either operand of a + t
 *    first, and an x86 add keeps the first one's; numpy's vector and scalar
 *    loops differ too): forcing the first costs a compare and blend per
 *    element, measured at 1.8x the kernel's time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 1024 /* accumulator elements kept in L1 while every input streams over them (8 KiB) */
#define MAX_INPUTS 65536

static inline double widen(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return (double)f;
}

/* The loops, each over restrict pointers (one input at a time, so the compiler
 * vectorizes them), compiled for AVX-512 and AVX2 beside the baseline where
 * the compiler can (the loader picks one by the CPU; 2-3x on the rounding). */
/* (gcc 11 and newer name the x86-64-v3/v4 levels; older compilers and clang
 * build the baseline loops only, rather than failing the optional build) */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#ifndef TARGETS
#define TARGETS
#endif

TARGETS static void set_mean(double *restrict a, const uint16_t *restrict x, Py_ssize_t m) {
    for (Py_ssize_t j = 0; j < m; j++) a[j] = widen(x[j]);
}
TARGETS static void add_mean(double *restrict a, const uint16_t *restrict x, Py_ssize_t m) {
    for (Py_ssize_t j = 0; j < m; j++) a[j] = a[j] + widen(x[j]);
}
TARGETS static void set_weighted(double *restrict a, const uint16_t *restrict x, double w, Py_ssize_t m) {
    for (Py_ssize_t j = 0; j < m; j++) a[j] = widen(x[j]) * w;
}
TARGETS static void add_weighted(double *restrict a, const uint16_t *restrict x, double w, Py_ssize_t m) {
    for (Py_ssize_t j = 0; j < m; j++) a[j] = a[j] + widen(x[j]) * w;
}

static void sum_chunk(double *a, const uint16_t *const *xs, const double *w, Py_ssize_t k_count, Py_ssize_t off,
                      Py_ssize_t m, int mean) {
    if (mean) {
        set_mean(a, xs[0] + off, m);
        for (Py_ssize_t k = 1; k < k_count; k++) add_mean(a, xs[k] + off, m);
    } else {
        set_weighted(a, xs[0] + off, w[0], m);
        for (Py_ssize_t k = 1; k < k_count; k++) add_weighted(a, xs[k] + off, w[k], m);
    }
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, const char *what) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->itemsize != itemsize || view->len % itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of %zd bytes", what, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* bf16_sum(acc, srcs, weights, mean): acc[:] = sum_k w_k * float64(srcs[k]) in
 * order (mean: the plain sum, weights unused).  acc: contiguous float64,
 * written; srcs: contiguous uint16 (bfloat16 bits), each as long as acc. */
static PyObject *bf16_sum(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *acc_obj, *srcs_obj, *weights_obj;
    int mean;
    if (!PyArg_ParseTuple(args, "OOOp", &acc_obj, &srcs_obj, &weights_obj, &mean)) return NULL;
    PyObject *srcs = PySequence_Fast(srcs_obj, "srcs must be a sequence");
    if (!srcs) return NULL;
    Py_ssize_t k_count = PySequence_Fast_GET_SIZE(srcs);
    PyObject *result = NULL;
    Py_buffer acc;
    Py_buffer *views = NULL;
    const uint16_t **xs = NULL;
    double *w = NULL;
    Py_ssize_t got = 0;
    if (k_count < 1 || k_count > MAX_INPUTS) {
        PyErr_SetString(PyExc_ValueError, "bf16_sum: 1 to 65536 inputs");
        Py_DECREF(srcs);
        return NULL;
    }
    if (get_buffer(acc_obj, &acc, 1, 8, "bf16_sum acc") < 0) {
        Py_DECREF(srcs);
        return NULL;
    }
    Py_ssize_t n = acc.len / 8;
    views = PyMem_Calloc((size_t)k_count, sizeof(Py_buffer));
    xs = PyMem_Calloc((size_t)k_count, sizeof(*xs));
    w = PyMem_Calloc((size_t)k_count, sizeof(double));
    if (!views || !xs || !w) {
        PyErr_NoMemory();
        goto done;
    }
    if (!mean) {
        PyObject *ws = PySequence_Fast(weights_obj, "weights must be a sequence");
        if (!ws) goto done;
        if (PySequence_Fast_GET_SIZE(ws) != k_count) {
            PyErr_SetString(PyExc_ValueError, "bf16_sum: one weight per input");
            Py_DECREF(ws);
            goto done;
        }
        for (Py_ssize_t k = 0; k < k_count; k++) {
            w[k] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(ws, k));
            if (w[k] == -1.0 && PyErr_Occurred()) {
                Py_DECREF(ws);
                goto done;
            }
        }
        Py_DECREF(ws);
    }
    for (; got < k_count; got++) {
        if (get_buffer(PySequence_Fast_GET_ITEM(srcs, got), &views[got], 0, 2, "bf16_sum src") < 0) goto done;
        if (views[got].len / 2 != n) {
            PyErr_SetString(PyExc_ValueError, "bf16_sum: every input as long as the accumulator");
            PyBuffer_Release(&views[got]);
            goto done;
        }
        xs[got] = (const uint16_t *)views[got].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    double *a = (double *)acc.buf;
    for (Py_ssize_t off = 0; off < n; off += CHUNK) {
        Py_ssize_t m = n - off < CHUNK ? n - off : CHUNK;
        sum_chunk(a + off, xs, w, k_count, off, m, mean);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t k = 0; k < got; k++) PyBuffer_Release(&views[k]);
    PyMem_Free(views);
    PyMem_Free(xs);
    PyMem_Free(w);
    PyBuffer_Release(&acc);
    Py_DECREF(srcs);
    return result;
}

static inline uint16_t round_bf16(double x, int nan) {
    float y = (float)x;
    double back = (double)y;
    uint32_t b, y0;
    uint64_t xb, bb;
    memcpy(&b, &y, 4);
    memcpy(&xb, &x, 8);
    memcpy(&bb, &back, 8);
    y0 = b;
    b -= (uint32_t)(xb < bb); /* |y| > |x| (same sign): the cast rounded away from zero */
    b |= (uint32_t)(xb != bb); /* inexact: the sticky bit */
    uint16_t r = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    if (nan) {
        uint16_t q = (uint16_t)((y0 >> 16) | 0x0040u);
        r = x != x ? q : r;
    }
    return r;
}

TARGETS static void round_quotient(const double *restrict s, uint16_t *restrict d, Py_ssize_t n, double q) {
    for (Py_ssize_t j = 0; j < n; j++) d[j] = round_bf16(s[j] / q, 0);
}
TARGETS static void round_quotient_nan(const double *restrict s, uint16_t *restrict d, Py_ssize_t n, double q) {
    for (Py_ssize_t j = 0; j < n; j++) d[j] = round_bf16(s[j] / q, 1);
}
TARGETS static void round_plain(const double *restrict s, uint16_t *restrict d, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n; j++) d[j] = round_bf16(s[j], 0);
}
TARGETS static void round_plain_nan(const double *restrict s, uint16_t *restrict d, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n; j++) d[j] = round_bf16(s[j], 1);
}

static void round_loop(const double *s, uint16_t *d, Py_ssize_t n, double q, int nan) {
    if (q > 0)
        nan ? round_quotient_nan(s, d, n, q) : round_quotient(s, d, n, q);
    else
        nan ? round_plain_nan(s, d, n) : round_plain(s, d, n);
}

/* f64_to_bf16(src, dst, divisor, nan): dst = bfloat16 bits of src (or of the
 * float64 quotient src / divisor when divisor > 0), one correct rounding.
 * nan=False: the caller knows src holds no NaN. */
static PyObject *f64_to_bf16(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *src_obj, *dst_obj;
    long long divisor;
    int nan;
    if (!PyArg_ParseTuple(args, "OOLp", &src_obj, &dst_obj, &divisor, &nan)) return NULL;
    Py_buffer src, dst;
    if (get_buffer(src_obj, &src, 0, 8, "f64_to_bf16 src") < 0) return NULL;
    if (get_buffer(dst_obj, &dst, 1, 2, "f64_to_bf16 dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (src.len / 8 != dst.len / 2) {
        PyErr_SetString(PyExc_ValueError, "f64_to_bf16: src and dst of different lengths");
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        return NULL;
    }
    Py_ssize_t n = src.len / 8;
    const double *s = (const double *)src.buf;
    uint16_t *d = (uint16_t *)dst.buf;
    Py_BEGIN_ALLOW_THREADS
    round_loop(s, d, n, divisor > 0 ? (double)divisor : 0.0, nan);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bf16_sum", bf16_sum, METH_VARARGS, "acc[:] = sum_k w_k * float64(bf16 srcs[k]), in order (mean: the plain sum)."},
    {"f64_to_bf16", f64_to_bf16, METH_VARARGS, "dst = float64 src (/ divisor) rounded once to bfloat16 bits."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernel", "The fused bfloat16 block kernel.", -1, methods,
                                     NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ckernel(void) { return PyModule_Create(&module); }
