"""A persistent worker for the HDF5 and TensorFlow fuzz tests (tests/test_fuzz.py).

HDF5 (through h5py) and TensorFlow's checkpoint reader are C/C++ libraries: a
corrupt file can crash or hang the process that reads it.  The fuzz tests
therefore run ema-avg here, in a child process that imports TensorFlow and
h5py once and then serves one request per line:

    {"op": "run", "args": [...]}
        -> {"code": exit code, "err": stderr (Python and C level), "out": stdout}
    {"op": "check", "family": "hdf5"|"tf", "inputs": [p1, p2], "newest": p,
     "output": path, "out_format": "safetensors"|"hdf5"|"tf", "roles": {name: role}}
        -> {"ok": bool, "why": str}: the output equals the mean of the inputs (averaged
           tensors) or the newest input (the rest), every input read independently
           by the real library (h5py, tf.train.load_checkpoint)
    {"op": "ping"} -> {"ok": true}

The answers go to a private copy of the original stdout; file descriptor 1
itself points at stderr, so nothing a library prints can corrupt the protocol.
The parent (the test) puts a timeout on every request and restarts the worker
when it dies.
"""

from __future__ import annotations

import warnings

_STARTUP_WARNING_FILTERS = list(warnings.filters)  # the interpreter's own, before any import adds some

import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from contextlib import redirect_stderr, redirect_stdout  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402


def _protocol_stream():
    """Keep the real stdout for answers; point fd 1 at stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
    return out


class _CaptureFd2:
    """What C code writes to file descriptor 2 while a case runs (a real user
    would see it on the terminal, so it counts as part of stderr).  The file is
    named by the parent (EMA_FUZZ_CAPTURE), so that what a crashing library
    printed last (an abort message) can be shown."""

    def __enter__(self):
        path = os.environ.get("EMA_FUZZ_CAPTURE")
        self._tmp = open(path, "w+b") if path else tempfile.TemporaryFile()
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()


def run(args: list[str]) -> dict:
    from ema_cli.cli import main

    err, out = io.StringIO(), io.StringIO()
    with _CaptureFd2() as cap, warnings.catch_warnings():
        # Python warnings as a fresh `ema-avg` process shows them: the startup
        # filters, and no memory of warnings shown by earlier cases
        warnings.resetwarnings()
        warnings.filters[:] = _STARTUP_WARNING_FILTERS
        with redirect_stderr(err), redirect_stdout(out):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - main() must never let anything out
                err.write("Traceback (escaped main):\n" + traceback.format_exc())
                code = -1
    return {"code": code, "err": err.getvalue() + cap.text, "out": out.getvalue()}


# --------------------------------------------------------------------------- reference readers
#
# Inputs are read lazily, tensor by tensor: ema-avg reads only what it needs (the
# averaged tensors of every input, the rest from the newest), so a corrupt tensor
# it never reads (a checksum TensorFlow checks only on reading) is no error.


class H5Ref:
    """Numeric datasets of an HDF5 file, read by h5py (native byte order; 2-byte
    opaque data tagged, or in legacy Keras files untagged, read as bfloat16)."""

    def __init__(self, path: str):
        import h5py

        self.f = h5py.File(path, "r")
        f = self.f
        self.legacy = "keras_version" in f.attrs or "layer_names" in f.attrs or (
            "model_weights" in f and "keras_version" in f["model_weights"].attrs)
        self.ds = {}
        seen = set()

        def walk(group, prefix):  # link by link (H5Ovisit reads more of each object header)
            for key in group:
                if not isinstance(group.get(key, getlink=True), h5py.HardLink):
                    continue
                obj = group[key]
                if isinstance(obj, h5py.Group):
                    if obj.id not in seen:
                        seen.add(obj.id)
                        walk(obj, prefix + key + "/")
                elif isinstance(obj, h5py.Dataset) and obj.shape is not None:
                    self.ds[prefix + key] = obj

        seen.add(f["/"].id)
        walk(f, "")

    def names(self):
        return set(self.ds)

    def get(self, name: str):
        """The dataset's values, or None when it is not a numeric tensor."""
        obj = self.ds[name]
        dt = obj.dtype
        if dt.kind == "V" and dt.fields is None and dt.subdtype is None:
            tag = obj.attrs.get("dtype")
            tag = tag.decode() if isinstance(tag, bytes) else tag
            known = isinstance(tag, str) and hasattr(ml_dtypes, tag)
            if known and np.dtype(getattr(ml_dtypes, tag)).itemsize == dt.itemsize:
                return obj[()].view(getattr(ml_dtypes, tag))
            if tag is None and self.legacy and dt.itemsize == 2:
                return obj[()].view(ml_dtypes.bfloat16)
            return None
        if dt.kind not in "fiub" or dt.fields is not None or dt.subdtype is not None:
            return None
        arr = np.asarray(obj[()])
        return arr.astype(arr.dtype.newbyteorder("="))

    def close(self):
        self.f.close()


class TFRef:
    def __init__(self, prefix: str):
        import tensorflow as tf

        self.r = tf.train.load_checkpoint(prefix)
        self._names = set(self.r.get_variable_to_shape_map())
        self._failed = None

    def names(self):
        return set(self._names)

    def get(self, name: str):
        # after a failed read TensorFlow's BundleReader aborts the process on the next lookup
        if self._failed is not None:
            raise RuntimeError(f"not read: the reader failed earlier ({self._failed})")
        try:
            v = self.r.get_tensor(name)
        except Exception as e:
            self._failed = f"{name}: {e}"
            raise
        if isinstance(v, (np.ndarray, np.generic)):
            return np.asarray(v)
        return np.asarray(v, dtype=object)  # a scalar string: bytes

    def close(self):
        self.r = None


class STRef:
    def __init__(self, path: str):
        from safetensors import safe_open

        with safe_open(path, "numpy") as f:
            self.t = {k: f.get_tensor(k) for k in f.keys()}

    def names(self):
        return set(self.t)

    def get(self, name):
        return self.t[name]

    def close(self):
        pass


class TorchRef:
    """The state dict's tensors as torch.load(weights_only=True) reads them:
    under the first of state_dict/model/module/model_state_dict that is a dict, else
    the top level; nested dicts flattened with '.'."""

    def __init__(self, path: str):
        import torch

        with open(path, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"  # legacy (non-zip) files cannot be mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        sd = obj
        if isinstance(obj, dict):
            for k in ("state_dict", "model", "module", "model_state_dict"):
                if isinstance(obj.get(k), dict):
                    sd = obj[k]
                    break
        self.t = {}

        def walk(d, prefix):
            for k, v in d.items():
                if isinstance(v, torch.Tensor):
                    self.t[prefix + str(k)] = v
                elif isinstance(v, dict):
                    walk(v, prefix + str(k) + ".")

        walk(sd if isinstance(sd, dict) else {}, "")

    def names(self):
        return set(self.t)

    def get(self, name):
        import torch

        v = self.t[name]
        if v.dtype == torch.bfloat16:
            return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return v.numpy()

    def close(self):
        self.t = {}


def rounded_mean(a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(a + b) / 2 in float64, rounded once to ``dtype`` (round-to-odd through
    float32 for bfloat16, so no double rounding)."""
    x = (a.astype(np.float64) + b.astype(np.float64)) / 2
    dtype = np.dtype(dtype)
    if dtype == np.float64 or dtype == np.float32 or dtype == np.float16:
        with np.errstate(all="ignore"):
            return x.astype(dtype)
    with np.errstate(all="ignore"):
        f = x.astype(np.float32)
        inexact = f.astype(np.float64) != x
        even = (f.view(np.uint32) & 1) == 0
        fix = inexact & even & np.isfinite(f)
        toward = np.where(x > f, np.inf, -np.inf).astype(np.float32)  # the other float32 neighbour of x
        f[fix] = np.nextafter(f[fix], toward[fix])
        return f.astype(dtype)


def _same(o: np.ndarray, want: np.ndarray) -> bool:
    if o.dtype.kind == "O" or want.dtype.kind == "O":
        def as_bytes(a):
            return [x if isinstance(x, bytes) else (x.encode() if isinstance(x, str) else repr(x))
                    for x in a.reshape(-1)]

        return o.dtype == want.dtype and o.shape == want.shape and as_bytes(o) == as_bytes(want)
    if o.shape != want.shape:
        return False
    if o.dtype.kind == "f" or o.dtype in (np.dtype(ml_dtypes.bfloat16),):
        a, b = o.astype(np.float64), want.astype(np.float64)
        return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))
    return bool(np.array_equal(o, want))


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def check(req: dict) -> dict:
    family, inputs, newest = req["family"], req["inputs"], req["newest"]
    roles = req["roles"]
    Ref = {"hdf5": H5Ref, "torch": TorchRef}.get(family, TFRef)
    fmt = req["out_format"]
    opened = []
    try:
        try:
            x1, x2 = Ref(inputs[0]), Ref(inputs[1])
            opened += [x1, x2]
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "why": f"ema-avg succeeded but the real library cannot open an input: {_short(e)}"}
        xn = x1 if os.path.abspath(newest) == os.path.abspath(inputs[0]) else x2
        try:
            out = {"safetensors": STRef, "hdf5": H5Ref, "tf": TFRef, "torch": TorchRef}[fmt](req["output"])
            opened.append(out)
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "why": f"the output is not readable: {_short(e)}"}
        problems = []
        missing = [n for n, r in roles.items() if r == "averaged" and n not in out.names()]
        if missing:
            problems.append(f"averaged tensors missing from the output: {missing[:3]}")
        for name in sorted(out.names()):
            try:
                o = out.get(name)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{name}: unreadable in the output: {_short(e)}")
                continue
            if o is None:
                continue  # not a numeric tensor (HDF5 output keeps other datasets as they were)
            role = roles.get(name)
            if role is None:
                if fmt != "hdf5":
                    problems.append(f"{name}: in the output but not a tensor of the newest input per inspect")
                    continue
                role = "kept"  # HDF5 output keeps the newest input's other datasets as they are
            src = [x1, x2] if role == "averaged" else [xn]
            vals = []
            for x in src:
                if name not in x.names():
                    where = inputs[0] if x is x1 else inputs[1]
                    problems.append(f"{name} ({role}): not in {where} per the real library")
                    break
                try:
                    v = x.get(name)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{name} ({role}): ema-avg read it, the real library cannot: {_short(e)}")
                    break
                if v is None:
                    problems.append(f"{name} ({role}): not a numeric tensor per the real library")
                    break
                vals.append(v)
            else:
                if role == "averaged":
                    a, b = vals
                    if a.shape != b.shape or a.dtype != b.dtype:
                        problems.append(f"{name}: averaged, but the inputs hold {a.dtype}{list(a.shape)} and "
                                        f"{b.dtype}{list(b.shape)}")
                        continue
                    if o.dtype != a.dtype:
                        problems.append(f"{name}: output dtype {o.dtype}, inputs {a.dtype}")
                        continue
                    want = rounded_mean(a, b, o.dtype)
                else:
                    want = vals[0]
                if not _same(o, want):
                    problems.append(f"{name} ({role}): output {o.dtype}{list(o.shape)} {o.reshape(-1)[:4]} "
                                    f"!= expected {want.dtype}{list(want.shape)} {want.reshape(-1)[:4]}")
        return {"ok": not problems, "why": "; ".join(problems)[:2000]}
    finally:
        for x in opened:
            x.close()


def main() -> None:
    proto = _protocol_stream()
    os.environ.pop("EMA_AVG_DEBUG", None)
    # the same environment the CLI gives TensorFlow (its import_tf), imported once
    from ema_cli.formats.tf_fmt import import_tf

    import_tf()
    import h5py  # noqa: F401
    import torch  # noqa: F401
    import ema_cli.cli  # noqa: F401

    proto.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op", "run")
        try:
            if op == "run":
                ans = run(req["args"])
            elif op == "check":
                ans = check(req)
            else:
                ans = {"ok": True}
        except Exception:  # noqa: BLE001 - a bug in this worker, reported to the test
            ans = {"worker_error": traceback.format_exc()}
        proto.write(json.dumps(ans) + "\n")


if __name__ == "__main__":
    main()
