"""Fuzzed readers: mutated checkpoints either average correctly or fail with the clean
one-line error; never a traceback, hang or crash.

safetensors cases run in this process.  HDF5 (h5py) and TensorFlow are C/C++
libraries that may crash or hang on corrupt bytes, so their cases run in a
persistent worker process (tests/fuzz_worker.py) with a timeout per case: a
crash or hang fails the example that caused it and a new worker takes over.
Every success is compared with what the real libraries (safetensors, h5py,
tf.train.load_checkpoint) read from the inputs.

CI runs a bounded, derandomized number of cases (100 per safetensors test, 40 per
HDF5/TF test: about 15 s); a longer, random run (every test; a failing example is
kept in pytest's temporary directory and named in the failure):

    EMA_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -q

EMA_FUZZ_TIMEOUT (seconds per worker request, default 30) and EMA_FUZZ_SHRINK=1
(shrink failing HDF5/TF examples; off by default) tune the worker tests, and
``--hypothesis-show-statistics`` shows how the cases ended.
"""

from __future__ import annotations

import io
import json
import os
import struct
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from conftest import save_st

EXAMPLES = int(os.environ.get("EMA_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="EMA_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run_in_process(args: list[str]) -> tuple[int, str]:
    """The real entry point, in this process (a crash would take pytest down with it)."""
    from ema_cli.cli import main

    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
    return code, err.getvalue()


def assert_clean(code: int, err: str, out) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code in (1, 2), (code, err)
    assert not os.path.exists(out)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    import ml_dtypes

    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
               "c": np.arange(3, dtype=np.int64), "d": rng.standard_normal(2).astype(np.float16)}
    save_st(d / "good-1.safetensors", tensors)
    return d, (d / "good-1.safetensors").read_bytes()


def check_case(d, data: bytes, name: str) -> None:
    bad = d / f"{name}-2.safetensors"
    bad.write_bytes(data)
    out = d / f"{name}-out.safetensors"
    if out.exists():
        out.unlink()
    code, err = run_in_process([d / "good-1.safetensors", bad, "-o", out])
    if code == 0:
        # a mutation that left a valid file: the result must be the real mean of what it holds
        import ml_dtypes  # noqa: F401
        from safetensors import safe_open

        with safe_open(str(d / "good-1.safetensors"), "numpy") as f1, safe_open(str(bad), "numpy") as f2, \
                safe_open(str(out), "numpy") as fo:
            for k in f1.keys():
                x1, x2, o = f1.get_tensor(k), f2.get_tensor(k), fo.get_tensor(k)
                if x1.dtype.kind == "i":
                    np.testing.assert_array_equal(o, x2)
                else:
                    want = (x1.astype(np.float64) + x2.astype(np.float64)) / 2
                    with np.errstate(all="ignore"):
                        np.testing.assert_array_equal(o.astype(np.float64), want.astype(o.dtype).astype(np.float64))
        out.unlink()
    else:
        assert_clean(code, err, out)


@FUZZ
@given(st.data())
def test_byte_mutations(base, data):
    d, raw = base
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        if not buf:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[i:]
        elif kind == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[i:i + data.draw(st.integers(1, 8))]
        else:
            buf[i] = data.draw(st.integers(0, 255))
    check_case(d, bytes(buf), "bytes")


# shapes that used to reach numpy and raise ValueError (internal error): too many
# dimensions, dimensions beyond int64, empty shapes numpy cannot describe
HOSTILE_SHAPES = [[1] * 65, [1] * 100_000, [0, 2**64], [2**63, 0], [0, 2**62, 4], [2**64], [-1, 0], [1.0],
                  [True], [0] * 64, [2**31] * 3]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=8,
)


@FUZZ
@given(st.data())
def test_header_mutations(base, data):
    d, raw = base
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "__whole__", "__metadata__"]))
        if field not in ("__whole__", "__metadata__") and not isinstance(header[name], dict):
            continue
        if field == "__whole__":
            header[name] = data.draw(json_values)
        elif field == "__metadata__":
            header["__metadata__"] = data.draw(json_values)
        elif field == "dtype":
            header[name]["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "BOOL", "X", ""]) | json_values)
        elif field == "shape":
            header[name]["shape"] = data.draw(st.lists(st.integers(-2, 20), max_size=3) | st.sampled_from(HOSTILE_SHAPES)
                                              | json_values)
        else:
            header[name]["data_offsets"] = data.draw(st.lists(st.integers(-5, len(body) + 5), min_size=2, max_size=2) | json_values)
    hb = json.dumps(header).encode()
    if data.draw(st.booleans()):
        hb += b" " * (-len(hb) % 8)
    check_case(d, struct.pack("<Q", len(hb)) + hb + body, "header")


# =========================================================================== HDF5 and TensorFlow
#
# h5py and TensorFlow's checkpoint reader are C/C++ libraries: a corrupt file may
# crash or hang the process reading it.  These cases run ema-avg in a persistent
# worker process (tests/fuzz_worker.py) with a timeout per request: a crash, a
# hang or a traceback fails the example with the mutation that caused it, and a
# new worker serves the next example.

import glob  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
WORKER = Path(__file__).with_name("fuzz_worker.py")
CASE_TIMEOUT = float(os.environ.get("EMA_FUZZ_TIMEOUT", "30"))  # seconds per request
WORKER_EXAMPLES = int(os.environ.get("EMA_FUZZ_EXAMPLES", "40"))
# no shrinking unless asked (EMA_FUZZ_SHRINK=1): a failure already names its mutation and
# keeps its files, and shrinking a crash restarts the worker many times
FUZZ_WORKER = settings(FUZZ, max_examples=WORKER_EXAMPLES, phases=[
    Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if os.environ.get("EMA_FUZZ_SHRINK") else [])])


class WorkerDied(Exception):
    """The worker crashed, hung or broke the protocol while serving a request."""


class Worker:
    """One ``fuzz_worker.py`` process, restarted after it dies."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path: Path | None = None
        self._buf = b""

    def _start(self) -> None:
        self.starts += 1
        self.log_path = self.logdir / f"worker-{self.starts}.log"
        env = dict(os.environ)
        env.pop("EMA_AVG_DEBUG", None)
        self.capture_path = Path(str(self.log_path) + ".case")  # C-level stderr of the request in progress
        env["EMA_FUZZ_CAPTURE"] = str(self.capture_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-u", str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(self.logdir))
        self._buf = b""
        self._answer(max(CASE_TIMEOUT, 120.0))  # {"ready": pid}: TensorFlow and h5py imported

    def log_tail(self, n: int = 1500) -> str:
        text = b""
        for p in (self.log_path, getattr(self, "capture_path", None)):
            try:
                text += p.read_bytes()[-n:] if p else b""
            except OSError:
                pass
        return text.decode("utf-8", "replace")

    def _died(self, what: str) -> WorkerDied:
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        return WorkerDied(f"{what}; worker {how}; its stderr ends with:\n{self.log_tail()}")

    def _answer(self, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise self._died(f"no answer within {timeout:.0f} s (hang)")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise self._died("the worker died (crash)")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        ans = json.loads(line)
        if "worker_error" in ans:
            raise AssertionError("bug in tests/fuzz_worker.py:\n" + ans["worker_error"])
        return ans

    def call(self, req: dict, timeout: float = CASE_TIMEOUT) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            self._start()
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died("the worker died (crash)") from None
        return self._answer(timeout)

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("fuzz-worker"))
    yield w
    w.close()


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-cases")


def _event(text: str) -> None:
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():  # outcome statistics of the fuzz tests, not of the regressions
        event(text)


def _call(worker: Worker, req: dict, what: str) -> dict:
    try:
        return worker.call(req)
    except WorkerDied as e:
        pytest.fail(f"{what}: {e}", pytrace=False)


def assert_clean_worker(res: dict, out_dir: Path, what: str) -> None:
    """The clean-error contract (as assert_clean), for a worker answer; the whole
    output directory must be empty (no output, no staging leftovers)."""
    err, code = res["err"], res["code"]
    assert "Traceback" not in err and "internal error" not in err, f"{what}\n{err}"
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}\nstderr: {err!r}"
    assert code in (1, 2), f"{what}\nexit {code}: {err}"
    assert not os.listdir(out_dir), f"{what}\nleft behind: {os.listdir(out_dir)}"


def run_other_command(worker: Worker, command: str, inputs: list[str], out_dir: Path, what: str) -> str:
    """``ema-avg inspect|plan INPUTS --json``: one JSON document, or the clean error."""
    res = _call(worker, {"op": "run", "args": [command, *inputs, "--json", "-q"]}, what)
    if res["code"] != 0:
        assert_clean_worker(res, out_dir, what)
        _event(f"{command}: error")
        return "error"
    assert not res["err"].strip(), f"{what}\nsucceeded but wrote to stderr: {res['err']!r}"
    json.loads(res["out"])
    _event(f"{command}: success")
    return "ok"


def run_worker_case(worker: Worker, family: str, inputs: list[str], out_dir: Path, out_name: str,
                    out_format: str, what: str) -> str:
    """``ema-avg INPUTS -o OUT --json`` in the worker; a success is checked against
    the real libraries' reading of the inputs.  Returns "ok" or "error"."""
    out = str(out_dir / out_name)
    res = _call(worker, {"op": "run", "args": [*inputs, "-o", out, "--json"]}, what)
    if res["code"] != 0:
        assert_clean_worker(res, out_dir, what)
        msg = next(ln for ln in res["err"].splitlines() if ln.startswith("error: "))
        _event(f"error: {re.sub(r'[0-9]+', 'N', msg.split(': ', 2)[-1])[:60]}")  # --hypothesis-show-statistics
        return "error"
    _event("success")
    err = res["err"]
    noise = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert not noise, f"{what}\nsucceeded but wrote to stderr: {err!r}"
    doc = json.loads(res["out"])
    assert [c["weight"] for c in doc["checkpoints"]] == [0.5, 0.5], f"{what}\n{doc['checkpoints']}"
    newest = doc["newest"]
    assert os.path.abspath(newest) in {os.path.abspath(p) for p in inputs}, (what, newest)
    ins = _call(worker, {"op": "run", "args": ["inspect", newest, "--json", "-q"]}, what + " (inspect)")
    assert ins["code"] == 0, f"{what}\naverage succeeded but inspect of {newest} failed: {ins['err']}"
    roles = {t["name"]: t["role"] for t in json.loads(ins["out"])["tensors"]}
    chk = _call(worker, {"op": "check", "family": family, "inputs": inputs, "newest": newest, "output": out,
                         "out_format": out_format, "roles": roles}, what + " (reference check)")
    assert chk["ok"], f"{what}\nwrong success: {chk['why']}"
    return "ok"


# --------------------------------------------------------------------------- byte mutations


def _word_values(n: int) -> list[int]:
    return [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1,
            n - 1, n, n + 1, n + 4096, n // 2]


def mutate_bytes(data, buf: bytearray, anchors: list[int], log: list[str], *, max_ops: int = 4,
                 kinds=("flip", "set", "word", "zero", "random", "truncate", "insert", "delete", "copy")) -> None:
    """1..max_ops structure-blind mutations, each at a random offset or near an
    interesting one (a signature, an object header, a tensor's data, a footer)."""
    # uniform offsets from a seeded Random: hypothesis' integers (and its randoms) favour 0 and
    # n - 1, which here means the signature (every case "not an HDF5 file") or the last byte
    rnd = random.Random(data.draw(st.integers(0, 2**32 - 1), label="offsets seed"))
    for _ in range(data.draw(st.integers(1, max_ops), label="operations")):
        n = len(buf)
        if not n:
            return
        if anchors and data.draw(st.booleans(), label="near an anchor"):
            pos = data.draw(st.sampled_from(anchors)) + data.draw(st.integers(-4, 24) | st.integers(0, 96))
            pos = min(max(pos, 0), n - 1)
        else:
            pos = rnd.randrange(n)
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind == "flip":
            bit = data.draw(st.integers(0, 7))
            buf[pos] ^= 1 << bit
            log.append(f"flip bit {bit} @{pos}")
        elif kind == "set":
            buf[pos] = v = data.draw(st.integers(0, 255))
            log.append(f"byte @{pos} = {v}")
        elif kind == "word":
            width = data.draw(st.sampled_from([1, 2, 4, 8]))
            v = data.draw(st.sampled_from(_word_values(n)) | st.integers(0, 2**64 - 1)) % (1 << (8 * width))
            buf[pos:pos + width] = v.to_bytes(width, "little")
            log.append(f"u{8 * width} @{pos} = {v}")
        elif kind in ("zero", "random"):
            k = data.draw(st.integers(1, 64))
            fill = bytes(k) if kind == "zero" else data.draw(st.binary(min_size=k, max_size=k))
            buf[pos:pos + k] = fill[: max(0, min(k, n - pos))]
            log.append(f"{kind} {k} bytes @{pos}")
        elif kind == "truncate":
            del buf[pos:]
            log.append(f"truncate to {pos}")
        elif kind == "insert":
            b = data.draw(st.binary(min_size=1, max_size=16))
            buf[pos:pos] = b
            log.append(f"insert {b.hex()} @{pos}")
        elif kind == "delete":
            k = data.draw(st.integers(1, 16))
            del buf[pos:pos + k]
            log.append(f"delete {k} @{pos}")
        else:  # copy a range over another (a plausible but wrong structure)
            src = rnd.randrange(n)
            k = data.draw(st.integers(1, 64))
            chunk = bytes(buf[src:src + k])
            buf[pos:pos + len(chunk)] = chunk[: n - pos]
            log.append(f"copy {len(chunk)} bytes @{src} -> @{pos}")


# --------------------------------------------------------------------------- HDF5

H5_FAMILIES = {
    "h5": ["ckpt-1.h5", "ckpt-2.h5", "ckpt-3.h5"],
    "keras": ["epoch-1.weights.h5", "epoch-2.weights.h5", "epoch-3.weights.h5", "epoch-4.weights.h5"],
    "keras_legacy": ["model-1.h5", "model-2.h5", "model-3.h5", "model-4.h5"],
}
_H5_SIGNATURES = (b"TREE", b"HEAP", b"SNOD", b"GCOL", b"OHDR", b"OCHK", b"BTHD", b"BTLF", b"BTIN",
                  b"FRHP", b"FHDB", b"FHIB", b"FSHD", b"FSSE")
_h5_anchor_cache: dict[Path, list[int]] = {}


def h5_anchors(path: Path) -> list[int]:
    """Offsets worth mutating near: the superblock, every signature, every object
    header and every dataset's data (contiguous or chunked), from the valid file."""
    if path in _h5_anchor_cache:
        return _h5_anchor_cache[path]
    import h5py

    raw = path.read_bytes()
    anchors = set(range(8, 96, 8))  # superblock fields (not its signature: that only makes "not HDF5")
    for sig in _H5_SIGNATURES:
        start = raw.find(sig)
        while start >= 0:
            anchors.add(start)
            start = raw.find(sig, start + 1)
    def messages(addr: int, end: int) -> None:
        """Version-1 object header messages (dataspace, datatype, layout, attributes...)
        from ``addr`` to ``end``: each message's data is an anchor."""
        p = addr
        while p + 8 <= min(end, len(raw)):
            mtype, msize = struct.unpack_from("<HH", raw, p)
            anchors.add(p + 8)
            if mtype == 0x10 and p + 24 <= len(raw):  # continuation: more messages elsewhere
                caddr, clen = struct.unpack_from("<QQ", raw, p + 8)
                if caddr + clen <= len(raw) and caddr not in seen:
                    seen.add(caddr)
                    anchors.add(caddr)
                    messages(caddr, caddr + clen)
            p += 8 + msize
            if msize == 0 and mtype == 0:
                break

    seen: set[int] = set()
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            addr = h5py.h5g.get_objinfo(f.id, name.encode()).objno[0]
            anchors.add(addr)
            if addr + 16 <= len(raw) and raw[addr] == 1:  # version-1 object header: messages follow
                (hsize,) = struct.unpack_from("<I", raw, addr + 8)
                messages(addr + 16, addr + 16 + hsize)
            if isinstance(obj, h5py.Dataset):
                off = obj.id.get_offset()
                if off is not None:
                    anchors.add(off)
                if obj.chunks:
                    for i in range(obj.id.get_num_chunks()):
                        anchors.add(obj.id.get_chunk_info(i).byte_offset)

        f.visititems(visit)
    _h5_anchor_cache[path] = sorted(a for a in anchors if 0 <= a < len(raw))
    return _h5_anchor_cache[path]


@FUZZ_WORKER
@given(st.data())
def test_hdf5_mutations(worker, cases_dir, data):
    """Keras 3, legacy Keras and plain HDF5 files, one of two mutated."""
    family = data.draw(st.sampled_from(sorted(H5_FAMILIES)), label="family")
    names = H5_FAMILIES[family]
    i = data.draw(st.integers(0, len(names) - 2), label="pair")
    pair = [FIXTURES / family / names[i], FIXTURES / family / names[i + 1]]
    victim = data.draw(st.integers(0, 1), label="mutated input")
    buf = bytearray(pair[victim].read_bytes())
    log: list[str] = []
    # in-place changes weigh more: HDF5 refuses any file whose length differs from the
    # end-of-file address its superblock records, so insert/delete/truncate rarely get further
    mutate_bytes(data, buf, h5_anchors(pair[victim]), log,
                 kinds=("flip", "flip", "set", "word", "word", "zero", "random", "copy", "copy",
                        "truncate", "insert", "delete"))
    command = data.draw(st.sampled_from(["average"] * 8 + ["inspect", "plan"]), label="command")
    out_format = data.draw(st.sampled_from(["safetensors", "safetensors", "hdf5"]), label="output")
    case = Path(tempfile.mkdtemp(dir=cases_dir, prefix=f"{family}-"))
    inputs = []
    for k, p in enumerate(pair):
        dst = case / p.name
        if k == victim:
            dst.write_bytes(bytes(buf))
        else:
            shutil.copyfile(p, dst)
        inputs.append(str(dst))
    (case / "out").mkdir()
    what = (f"HDF5 case {case}: {family} {pair[0].name} + {pair[1].name}, {pair[victim].name} mutated: "
            f"{'; '.join(log)} -> {command if command != 'average' else out_format}")
    if command != "average":
        run_other_command(worker, command, inputs, case / "out", what)
    else:
        run_worker_case(worker, "hdf5", inputs, case / "out",
                        "avg.safetensors" if out_format == "safetensors" else "avg.h5", out_format, what)
    shutil.rmtree(case)


# --------------------------------------------------------------------------- TensorFlow

TF_FAMILIES = {"tf1": [f"model.ckpt-{k}" for k in range(6)], "tf2": [f"ckpt-{k}" for k in (1, 2, 3)]}
TF_DATA = ".data-00000-of-00001"


def tf_files(prefix: Path) -> list[Path]:
    return [p for p in (Path(str(prefix) + s) for s in (".index", TF_DATA, ".meta")) if p.exists()]


def copy_tf(prefix: Path, case: Path) -> Path:
    for f in tf_files(prefix):
        shutil.copyfile(f, case / f.name)
    return case / prefix.name


def _tf_pair(data):
    family = data.draw(st.sampled_from(sorted(TF_FAMILIES)), label="family")
    names = TF_FAMILIES[family]
    i = data.draw(st.integers(0, len(names) - 2), label="pair")
    victim = data.draw(st.integers(0, 1), label="mutated input")
    return family, [FIXTURES / family / names[i], FIXTURES / family / names[i + 1]], victim


def _tf_case(worker, cases_dir, data, family, pair, victim, mutate, log) -> None:
    case = Path(tempfile.mkdtemp(dir=cases_dir, prefix=f"{family}-"))
    prefixes = [copy_tf(p, case) for p in pair]
    mutate(Path(str(prefixes[victim])))
    command = data.draw(st.sampled_from(["average"] * 8 + ["inspect", "plan"]), label="command")
    out_format = data.draw(st.sampled_from(["safetensors", "tf"]), label="output")
    (case / "out").mkdir()
    what = (f"TF case {case}: {family} {pair[0].name} + {pair[1].name}, {pair[victim].name} mutated: "
            f"{'; '.join(log)} -> {command if command != 'average' else out_format}")
    if command != "average":
        run_other_command(worker, command, [str(p) for p in prefixes], case / "out", what)
    else:
        run_worker_case(worker, "tf", [str(p) for p in prefixes], case / "out",
                        "avg.safetensors" if out_format == "safetensors" else "avg.ckpt", out_format, what)
    shutil.rmtree(case)


@FUZZ_WORKER
@given(st.data())
def test_tf_byte_mutations(worker, cases_dir, data):
    """TF1 (with .meta) and TF2 checkpoints: raw bytes of the .index, the data
    file or the .meta mutated, or one of the files deleted."""
    family, pair, victim = _tf_pair(data)
    log: list[str] = []

    def mutate(prefix: Path) -> None:
        kinds = ["index", "index", "data", "data", "delete index", "delete data"]
        kinds += ["meta"] if family == "tf1" else []
        target = data.draw(st.sampled_from(kinds), label="target")
        path = Path(str(prefix) + {"index": ".index", "data": TF_DATA, "meta": ".meta"}[target.split()[-1]])
        if target.startswith("delete"):
            path.unlink()
            log.append(f"deleted {path.name}")
            return
        raw = path.read_bytes()
        anchors = [0, max(0, len(raw) - 48), max(0, len(raw) - 53)]
        if target == "index":
            anchors += [raw.find(k) for k, _ in read_table(raw) if k and raw.find(k) >= 0]
        elif target == "data":
            anchors += sorted({e.offset for e in _bundle_entries(Path(str(prefix) + ".index").read_bytes()).values()
                               if e is not None})
        buf = bytearray(raw)
        mutate_bytes(data, buf, anchors, log)
        log.insert(0, f"{path.name}:")
        path.write_bytes(bytes(buf))

    _tf_case(worker, cases_dir, data, family, pair, victim, mutate, log)


# TF's .index is an SSTable (LevelDB's table format, uncompressed): blocks of
# prefix-compressed key/value entries, each block followed by a type byte and a
# masked CRC32C, then a 48-byte footer.  Key "" holds the BundleHeaderProto, every
# other key a BundleEntryProto (dtype, shape, shard, offset, size, crc32c of the
# data, slices).  Rewriting it lets mutations get past the checksums.

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


SST_MAGIC = 0xDB4775248B80FB57


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    (nr,) = struct.unpack_from("<I", block, len(block) - 4)
    end, out, key, i = len(block) - 4 * (nr + 1), [], b"", 0
    while i < end:
        shared, i = _read_varint(block, i)
        nonshared, i = _read_varint(block, i)
        vlen, i = _read_varint(block, i)
        key = key[:shared] + block[i:i + nonshared]
        i += nonshared
        out.append((key, block[i:i + vlen]))
        i += vlen
    return out


def sst_footer(raw: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """(metaindex handle, index handle) of a valid table."""
    footer = raw[-48:]
    assert struct.unpack_from("<Q", footer, 40)[0] == SST_MAGIC
    moff, i = _read_varint(footer, 0)
    msize, i = _read_varint(footer, i)
    ioff, i = _read_varint(footer, i)
    isize, i = _read_varint(footer, i)
    return (moff, msize), (ioff, isize)


def read_table(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a valid table, in order."""
    _, (ioff, isize) = sst_footer(raw)
    entries = []
    for _, handle in _block_entries(raw[ioff:ioff + isize]):
        off, j = _read_varint(handle, 0)
        size, _ = _read_varint(handle, j)
        entries += _block_entries(raw[off:off + size])
    return entries


def _block(entries, restart_interval: int = 16) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for n, (k, v) in enumerate(entries):
        shared = 0
        if n % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(k), len(prev)) and k[shared] == prev[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(k) - shared) + _varint(len(v)) + k[shared:] + v
        prev = k
    restarts = restarts or [0]
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def write_table(entries, restart_interval: int = 16) -> bytes:
    """A table holding ``entries`` in the order given (one data block), every checksum right."""
    out = bytearray()

    def put(block: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(block))
        out.extend(block + b"\x00" + struct.pack("<I", masked_crc32c(block + b"\x00")))
        return handle

    data_h = put(_block(entries, restart_interval))
    meta_h = put(_block([]))
    index_h = put(_block([(max((k for k, _ in entries), default=b""), data_h)]))
    footer = meta_h + index_h
    return bytes(out + footer + b"\x00" * (40 - len(footer)) + struct.pack("<Q", SST_MAGIC))


def _bundle_protos():
    from tensorflow.core.protobuf import tensor_bundle_pb2

    return tensor_bundle_pb2


def _bundle_entries(raw_index: bytes) -> dict[bytes, object]:
    """key -> BundleEntryProto (None for the header) of a valid index."""
    tb = _bundle_protos()
    return {k: (tb.BundleEntryProto.FromString(v) if k else None) for k, v in read_table(raw_index)}


_TF_DTYPES = list(range(0, 34)) + [101, 114, 1000, -1]
_BIG = [0, 1, 2, 3, 5, 8, 12, 24, 48, 100, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -1, -2**63]


@FUZZ_WORKER
@given(st.data())
def test_tf_index_mutations(worker, cases_dir, data):
    """Structure-aware TF mutations that get past the checksums: the header and
    bundle entries (dtype, shape, shard, offset, size, crc, slices, keys)
    rewritten in a table with valid block checksums, and data bytes changed with
    the entry's CRC32C updated (a valid checkpoint holding other values)."""
    family, pair, victim = _tf_pair(data)
    log: list[str] = []
    tb = _bundle_protos()

    def mutate(prefix: Path) -> None:
        index, data_file = Path(str(prefix) + ".index"), Path(str(prefix) + TF_DATA)
        entries = read_table(index.read_bytes())
        blob = bytearray(data_file.read_bytes())
        keys = [k for k, _ in entries if k]
        for _ in range(data.draw(st.integers(1, 3), label="operations")):
            op = data.draw(st.sampled_from(["dtype", "shape", "offset", "size", "shard", "crc", "slices", "header",
                                            "rename", "drop", "duplicate", "swap", "data", "data", "data-size"]),
                           label="op")
            j = data.draw(st.integers(0, len(entries) - 1), label="entry")
            if op == "header":
                j = 0  # TensorFlow reads the first entry as the header, whatever its key
                try:
                    h = tb.BundleHeaderProto.FromString(entries[j][1])
                except Exception:  # noqa: BLE001 - not a header any more
                    continue
                field = data.draw(st.sampled_from(["num_shards", "endianness", "producer", "min_consumer", "bad"]))
                v = data.draw(st.sampled_from([0, 1, 2, 3, 100, 2**31 - 1, -1]))
                if field == "num_shards":
                    h.num_shards = v
                elif field == "endianness":
                    h.endianness = v % 2
                elif field == "producer":
                    h.version.producer = v
                elif field == "min_consumer":
                    h.version.min_consumer = v
                else:
                    h.version.bad_consumers.append(v)
                entries[j] = (entries[j][0], h.SerializeToString())
                log.append(f"header.{field} = {v}")
                continue
            key, val = entries[j]
            if op == "rename":
                new = bytearray(key or b"x")
                p = data.draw(st.integers(0, len(new) - 1))
                new[p] = data.draw(st.integers(0, 255))
                entries[j] = (bytes(new), val)
                log.append(f"key {key!r} -> {bytes(new)!r}")
                continue
            if op == "drop":
                del entries[j]
                log.append(f"dropped {key!r}")
                continue
            if op == "duplicate":
                entries.insert(j, entries[j])
                log.append(f"duplicated {key!r}")
                continue
            if op == "swap":
                k2 = data.draw(st.integers(0, len(entries) - 1))
                entries[j], entries[k2] = (key, entries[k2][1]), (entries[k2][0], val)
                log.append(f"swapped the values of {key!r} and {entries[k2][0]!r}")
                continue
            if key == b"":
                continue  # the header: handled above
            e = tb.BundleEntryProto.FromString(val)
            if op == "dtype":
                e.dtype = data.draw(st.sampled_from(_TF_DTYPES))
                log.append(f"{key!r}.dtype = {e.dtype}")
            elif op == "shape":
                how = data.draw(st.sampled_from(["set", "append", "pop", "unknown_rank"]))
                if how == "set" and e.shape.dim:
                    d = data.draw(st.integers(0, len(e.shape.dim) - 1))
                    e.shape.dim[d].size = data.draw(st.sampled_from(_BIG) | st.integers(-3, 64))
                elif how == "append":
                    e.shape.dim.add().size = data.draw(st.sampled_from(_BIG) | st.integers(-3, 64))
                elif how == "pop" and e.shape.dim:
                    del e.shape.dim[-1]
                elif how == "unknown_rank":
                    e.shape.unknown_rank = True
                log.append(f"{key!r}.shape {how}: {[d.size for d in e.shape.dim]}")
            elif op in ("offset", "size"):
                v = data.draw(st.sampled_from(_BIG + [len(blob), len(blob) - 1, len(blob) + 1])
                              | st.integers(0, len(blob)))
                setattr(e, op, max(-2**63, min(v, 2**63 - 1)))
                log.append(f"{key!r}.{op} = {v}")
            elif op == "shard":
                e.shard_id = data.draw(st.sampled_from([1, 2, -1, 2**31 - 1]))
                log.append(f"{key!r}.shard_id = {e.shard_id}")
            elif op == "crc":
                e.crc32c = data.draw(st.integers(0, 2**32 - 1))
                log.append(f"{key!r}.crc32c = {e.crc32c}")
            elif op == "slices":
                if e.slices and data.draw(st.booleans()):
                    del e.slices[:]
                    log.append(f"{key!r}.slices cleared")
                else:
                    s = e.slices.add()
                    for _ in range(data.draw(st.integers(0, 3))):
                        ext = s.extent.add()
                        if data.draw(st.booleans()):
                            ext.start = data.draw(st.sampled_from(_BIG) | st.integers(-2, 8))
                            ext.length = data.draw(st.sampled_from(_BIG) | st.integers(-2, 8))
                    log.append(f"{key!r}.slices += {[(x.start, x.length) for x in s.extent]}")
            elif op == "data" and e.size > 0 and e.offset + e.size <= len(blob):
                # other values with a valid checksum: ema-avg must average exactly those
                p = e.offset + data.draw(st.integers(0, e.size - 1))
                k = data.draw(st.integers(1, 8))
                new = data.draw(st.binary(min_size=k, max_size=k) | st.sampled_from([b"\x00" * k, b"\xff" * k]))
                blob[p:p + k] = new[: e.offset + e.size - p]
                e.crc32c = masked_crc32c(bytes(blob[e.offset:e.offset + e.size]))
                log.append(f"data of {key!r} @{p} = {new.hex()}, crc updated")
            elif op == "data-size":
                n = data.draw(st.sampled_from([0, 1, len(blob) // 2, len(blob) - 1, len(blob) + 7]))
                blob = blob[:n] + bytes(max(0, n - len(blob)))
                log.append(f"data file resized to {n}")
            entries[j] = (key, e.SerializeToString())
        if data.draw(st.booleans(), label="sort keys"):
            entries.sort(key=lambda kv: kv[0])
            log.append("sorted")
        index.write_bytes(write_table(entries, data.draw(st.sampled_from([1, 16]), label="restart interval")))
        data_file.write_bytes(bytes(blob))

    _tf_case(worker, cases_dir, data, family, pair, victim, mutate, log)


# --------------------------------------------------------------------------- PyTorch
#
# torch.load's zip reader is C++ (miniz in PyTorchStreamReader) and its restricted
# unpickler reads data.pkl: both see mutated bytes, in the worker.


@pytest.fixture(scope="module")
def torch_pair(tmp_path_factory):
    """Two fairseq-like checkpoints (zip) written by real torch: a tied
    embedding, bf16 and fp16 tensors, an int counter, optimizer state; and a
    legacy (non-zip) pair."""
    import torch

    d = tmp_path_factory.mktemp("fuzz-torch")
    for k in (1, 2):
        g = torch.Generator().manual_seed(k)
        emb = torch.randn(5, 4, generator=g)
        sd = {"embed.weight": emb, "out.weight": emb, "bn.running_var": torch.rand(4, generator=g),
              "h.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
              "h.bias": torch.randn(3, generator=g).half(), "bn.num_batches_tracked": torch.tensor(10 * k)}
        ckpt = {"model": sd, "args": None, "extra_state": {"num_updates": 10 * k},
                "last_optimizer_state": {"state": {0: {"exp_avg": torch.randn(5, 4, generator=g)}},
                                         "param_groups": [{"lr": 0.1, "params": [0]}]}}
        torch.save(ckpt, d / f"checkpoint_{k}.pt")
        torch.save(ckpt, d / f"legacy_{k}.pt", _use_new_zipfile_serialization=False)
    return d


def torch_anchors(raw: bytes) -> list[int]:
    """Local headers, record data, the central directory and its end record."""
    import zipfile

    anchors = {0}
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            for i in z.infolist():
                anchors.add(i.header_offset)
                anchors.add(i.header_offset + 30 + len(i.filename.encode()) + len(i.extra))
    except zipfile.BadZipFile:
        pass
    for sig in (b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"):
        start = raw.find(sig)
        while start >= 0:
            anchors.add(start)
            start = raw.find(sig, start + 1)
    return sorted(a for a in anchors if a < len(raw))


@FUZZ_WORKER
@given(st.data())
def test_torch_byte_mutations(worker, cases_dir, torch_pair, data):
    """torch.save files (zip or legacy pickle), one of two mutated; averaged to
    safetensors or .pt, or inspected / planned."""
    kind = data.draw(st.sampled_from(["checkpoint", "checkpoint", "checkpoint", "legacy"]), label="kind")
    pair = [torch_pair / f"{kind}_1.pt", torch_pair / f"{kind}_2.pt"]
    victim = data.draw(st.integers(0, 1), label="mutated input")
    raw = pair[victim].read_bytes()
    buf = bytearray(raw)
    log: list[str] = []
    anchors = torch_anchors(raw) if kind == "checkpoint" else [0, 2, 12, len(raw) // 2]
    mutate_bytes(data, buf, anchors, log)
    command = data.draw(st.sampled_from(["average"] * 8 + ["inspect", "plan"]), label="command")
    out_format = data.draw(st.sampled_from(["safetensors", "torch"]), label="output")
    case = Path(tempfile.mkdtemp(dir=cases_dir, prefix=f"torch-{kind}-"))
    inputs = []
    for k, p in enumerate(pair):
        dst = case / p.name
        dst.write_bytes(bytes(buf) if k == victim else p.read_bytes())
        inputs.append(str(dst))
    (case / "out").mkdir()
    what = (f"torch case {case}: {pair[victim].name} mutated: {'; '.join(log)} -> "
            f"{command if command != 'average' else out_format}")
    if command != "average":
        run_other_command(worker, command, inputs, case / "out", what)
    else:
        run_worker_case(worker, "torch", inputs, case / "out",
                        "avg.safetensors" if out_format == "safetensors" else "avg.pt", out_format, what)
    shutil.rmtree(case)


# --------------------------------------------------------------------------- regressions
#
# Inputs the fuzzers above found to crash (abort), hang or poison the process,
# rebuilt by hand so that they stay covered whatever the fuzzers draw.  They run
# in the worker too: a regression must fail the test, not kill pytest.


def _edit_tf(prefix: Path, edit) -> None:
    """Rewrite a checkpoint's .index with valid checksums after ``edit(entries, tb)``
    changed its list of (key, value) pairs in place."""
    index = Path(str(prefix) + ".index")
    entries = read_table(index.read_bytes())
    edit(entries, _bundle_protos())
    index.write_bytes(write_table(entries))


def _set_entry(entries, tb, key: bytes, change) -> None:
    j = next(i for i, (k, _) in enumerate(entries) if k == key)
    e = tb.BundleEntryProto.FromString(entries[j][1])
    change(e)
    entries[j] = (key, e.SerializeToString())


_SLICE0 = b"\x00part\x00\x01\x01\x02\x80\x83\x80\x82"  # the first stored slice of the partitioned 'part'

TF_REGRESSIONS = {
    # slice entry with dtype DT_INVALID: Tensor() aborts ("Type not set") in GetSliceValue
    "slice-dtype-invalid": ("tf1", lambda en, tb: _set_entry(en, tb, _SLICE0, lambda e: setattr(e, "dtype", 0))),
    # slice stored as int32 for a float variable: flat<float>() CHECK in GetSliceValue
    "slice-dtype-other": ("tf1", lambda en, tb: _set_entry(en, tb, _SLICE0, lambda e: setattr(e, "dtype", 3))),
    # a partitioned entry twice: "filtered_keys.insert(...).second" CHECK in load_checkpoint
    "slice-listed-twice": ("tf1", lambda en, tb: en.insert(next(i for i, (k, _) in enumerate(en) if k == b"part"),
                                                            next((k, v) for k, v in en if k == b"part"))),
    # the header entry gone: TensorFlow takes the first entry as the header, then as above
    "header-dropped": ("tf1", lambda en, tb: (en.pop(0), en.insert(1, next((k, v) for k, v in en if k == b"part")))),
    # a key twice, the first copy with dtype DT_INVALID: the dtype map has the valid one, the
    # lookup finds the other ("Type not set" in get_tensor)
    "key-twice": ("tf1", lambda en, tb: en.insert(
        next(i for i, (k, _) in enumerate(en) if k == b"dense/bias"),
        (b"dense/bias", tb.BundleEntryProto(dtype=0, shape=tb.BundleEntryProto.FromString(
            next(v for k, v in en if k == b"dense/bias")).shape).SerializeToString()))),
    # negative / overflowing / too many dimensions: TensorShape CHECKs in load_checkpoint
    "negative-dim": ("tf2", lambda en, tb: _set_entry(en, tb, b"w/.ATTRIBUTES/VARIABLE_VALUE",
                                                      lambda e: setattr(e.shape.dim[0], "size", -5))),
    "overflowing-shape": ("tf2", lambda en, tb: _set_entry(en, tb, b"w/.ATTRIBUTES/VARIABLE_VALUE", lambda e: (
        setattr(e.shape.dim[0], "size", 2**62), setattr(e.shape.dim[1], "size", 2**62)))),
    "too-many-dims": ("tf2", lambda en, tb: _set_entry(en, tb, b"w/.ATTRIBUTES/VARIABLE_VALUE",
                                                       lambda e: [e.shape.dim.add() for _ in range(300)])),
    # an entry that does not parse: "entry.ParseFromArray" CHECK in load_checkpoint
    "unparseable-entry": ("tf2", lambda en, tb: en.__setitem__(
        next(i for i, (k, _) in enumerate(en) if k == b"w/.ATTRIBUTES/VARIABLE_VALUE"),
        (b"w/.ATTRIBUTES/VARIABLE_VALUE", b"\xff\xff\xff"))),
    # a huge shape with a matching size: TensorFlow allocates it (12 TiB) before reading fails; now
    # refused up front, as its bytes lie beyond the end of the data file
    "huge-shape": ("tf2", lambda en, tb: _set_entry(en, tb, b"w/.ATTRIBUTES/VARIABLE_VALUE", lambda e: (
        setattr(e.shape.dim[0], "size", 2**40), setattr(e, "size", 2**40 * 3 * 4)))),
}


@pytest.mark.parametrize("name", sorted(TF_REGRESSIONS))
def test_tf_index_regressions(worker, tmp_path, name):
    """Each of these aborted the process inside TensorFlow before tf_fmt checked the index."""
    family, edit = TF_REGRESSIONS[name]
    pair = [FIXTURES / family / n for n in TF_FAMILIES[family][:2]]
    prefixes = [copy_tf(p, tmp_path) for p in pair]
    _edit_tf(prefixes[1], edit)
    out = tmp_path / "out"
    out.mkdir()
    res = _call(worker, {"op": "run", "args": [*map(str, prefixes), "-o", str(out / "avg.safetensors")]}, name)
    assert_clean_worker(res, out, name)
    assert "corrupt index" in res["err"] or "truncated or corrupt" in res["err"], res["err"]


def test_tf_reader_survives_a_failed_read(tmp_path):
    """TensorFlow's BundleReader kept the status of a failed read of a
    partitioned variable and aborted the process on its next lookup (with
    several threads, the reads queued after the first failure killed ema-avg).
    The TF-free reader keeps no such state: the damaged slice's read is a clean
    error naming the data file and the variable, and the other tensors read."""
    prefix = copy_tf(FIXTURES / "tf1" / "model.ckpt-1", tmp_path)
    index = Path(str(prefix) + ".index")
    entry = _bundle_entries(index.read_bytes())[_SLICE0]
    data = Path(str(prefix) + TF_DATA)
    raw = bytearray(data.read_bytes())
    raw[entry.offset] ^= 0x55  # checksum mismatch on reading a slice of 'part'
    data.write_bytes(bytes(raw))
    code = (
        "import sys\n"
        "from ema_cli.errors import EmaError\n"
        "from ema_cli.formats import resolve_inputs, open_reader\n"
        "r = open_reader(resolve_inputs([sys.argv[1]])[0])\n"
        "for name in ('part', 'dense/bias', 'global_step'):\n"
        "    try:\n"
        "        r.read(name)\n"
        "        print('read', name)\n"
        "    except EmaError as e:\n"
        "        print('error', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(prefix)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and lines[1:] == ["read dense/bias", "read global_step"], proc.stdout
    assert lines[0] == (f"error {data}: tensor 'part': truncated or corrupt data: checksum mismatch "
                        "(the data file does not hold what its index says)"), proc.stdout


def test_hdf5_corrupt_global_heap_is_an_error_not_a_hang(worker, tmp_path):
    """A global heap collection whose first object reads as free space of size 0:
    HDF5 loops forever parsing it (H5HG__cache_heap_deserialize) when the
    variable-length 'dtype' attribute of the bfloat16 dataset is read."""
    for name in ("ckpt-1.h5", "ckpt-2.h5"):
        shutil.copyfile(FIXTURES / "h5" / name, tmp_path / name)
    bad = tmp_path / "ckpt-2.h5"
    raw = bytearray(bad.read_bytes())
    heap = raw.find(b"GCOL\x01")
    assert heap > 0
    raw[heap + 16:heap + 32] = bytes(16)  # object header: index 0, size 0
    bad.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    for target in ("avg.safetensors", "avg.h5"):
        res = _call(worker, {"op": "run", "args": [str(tmp_path / "ckpt-1.h5"), str(bad), "-o", str(out / target)]},
                    "corrupt global heap")
        assert_clean_worker(res, out, "corrupt global heap")
        assert "global heap" in res["err"] and str(bad) in res["err"], res["err"]


def _h5_message(path: Path, dataset: str, mtype: int) -> int:
    """The file offset of the data of a dataset's first ``mtype`` message (version-1 object header)."""
    import h5py

    raw = path.read_bytes()
    with h5py.File(path, "r") as f:
        addr = h5py.h5g.get_objinfo(f.id, dataset.encode()).objno[0]
    assert raw[addr] == 1
    (hsize,) = struct.unpack_from("<I", raw, addr + 8)
    p = addr + 16
    while p < addr + 16 + hsize:
        t, size = struct.unpack_from("<HH", raw, p)
        if t == mtype:
            return p + 8
        p += 8 + size
    raise AssertionError(f"no message {mtype} in {dataset}")


@pytest.mark.parametrize("out_name", ["avg.safetensors", "avg.h5"])
def test_hdf5_float_type_that_is_not_ieee_is_not_a_tensor(worker, tmp_path, out_name):
    """A float32 dataset whose datatype message says 'no implied mantissa bit':
    numpy (h5py) still calls it <f4, but its bytes are not IEEE floats.  ema-avg
    mapped those bytes as float32 and averaged them (a wrong success).  Such a
    dataset is not a tensor (an average could not be stored back exactly): a
    clean error here, as the other input has it as a tensor."""
    names = ["epoch-1.weights.h5", "epoch-2.weights.h5"]
    for n in names:
        shutil.copyfile(FIXTURES / "keras" / n, tmp_path / n)
    newest = tmp_path / names[1]
    at = _h5_message(newest, "layers/dense/vars/0", 3)  # the datatype message
    raw = bytearray(newest.read_bytes())
    assert raw[at] & 0x0F == 1 and raw[at + 1] & 0x30 == 0x20  # floating point, implied mantissa msb
    raw[at + 1] &= ~0x30 & 0xFF  # mantissa not normalized
    newest.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    inputs = [str(tmp_path / n) for n in names]
    fmt = "hdf5" if out_name.endswith(".h5") else "safetensors"
    assert run_worker_case(worker, "hdf5", inputs, out, out_name, fmt, "non-IEEE float type") == "error"
    res = _call(worker, {"op": "run", "args": ["inspect", str(newest), "--json", "-q"]}, "inspect")
    assert res["code"] == 0 and "layers/dense/vars/0" not in {t["name"] for t in json.loads(res["out"])["tensors"]}
