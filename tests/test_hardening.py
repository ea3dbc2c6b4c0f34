"""Issue 7: every bad input is a one-line error that loses nothing; no partial output, ever."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_error, load_st, run_cli, save_st


def no_output(outdir: Path, name: str = "out.safetensors") -> None:
    assert not (outdir / name).exists()
    leftovers = [p.name for p in outdir.iterdir() if ".ema-avg-" in p.name]
    assert not leftovers, leftovers


def header_bytes(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.fixture
def good(tmp_path):
    """Two valid checkpoints in tmp_path/in; outputs go to tmp_path/out."""
    d = tmp_path / "in"
    d.mkdir()
    (tmp_path / "out").mkdir()
    for k in (1, 2):
        save_st(d / f"ckpt-{k}.safetensors", {"w": np.full((4, 4), k, np.float32), "b": np.full(3, k, np.float32)})
    return d


def bad_file(good: Path, data: bytes) -> list[str]:
    p = good / "ckpt-3.safetensors"
    p.write_bytes(data)
    return [str(good / "ckpt-1.safetensors"), str(good / "ckpt-2.safetensors"), str(p)]


VALID = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, "b": {"dtype": "F32", "shape": [3], "data_offsets": [64, 76]}}


def corrupt_cases():
    data = bytes(76)
    return {
        "empty file": (b"", "truncated"),
        "truncated header": (header_bytes(VALID)[:20], "larger than the file"),
        "truncated data": (header_bytes(VALID) + data[:50], "truncated"),
        "garbage header": (struct.pack("<Q", 8) + b"\x00\xffgarb\x01" + data, "garbage header"),
        "header length larger than file": (struct.pack("<Q", 10_000) + b"{}", "larger than the file"),
        "header over size limit": (struct.pack("<Q", 200_000_000) + b"{}", "limit"),
        "overlapping offsets": (header_bytes({**VALID, "b": {"dtype": "F32", "shape": [3], "data_offsets": [60, 72]}}) + data, "overlaps"),
        "out-of-range offsets": (header_bytes({**VALID, "b": {"dtype": "F32", "shape": [3], "data_offsets": [64, 76]}}) + data[:70], "truncated"),
        "offsets not matching shape": (header_bytes({**VALID, "b": {"dtype": "F32", "shape": [3], "data_offsets": [64, 80]}}) + bytes(80), "do not hold"),
        "unknown dtype": (header_bytes({**VALID, "b": {"dtype": "Q7", "shape": [3], "data_offsets": [64, 76]}}) + data, "unknown dtype 'Q7'"),
        "negative shape": (header_bytes({**VALID, "b": {"dtype": "F32", "shape": [-3], "data_offsets": [64, 76]}}) + data, "invalid shape"),
        "header not an object": (header_bytes([1, 2]) + data, "not an object"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_corrupt_safetensors(good, case):
    data, needle = corrupt_cases()[case]
    ins = bad_file(good, data)
    out = good.parent / "out"
    res = run_cli(*ins, "-o", out / "out.safetensors")
    line = assert_clean_error(res, "ckpt-3.safetensors", needle, code=1)
    assert line.startswith(f"error: {ins[-1]}: ")
    no_output(out)


def test_input_path_problems(good, tmp_path):
    out = tmp_path / "out" / "out.safetensors"
    assert_clean_error(run_cli(tmp_path / "nope.safetensors", "-o", out), "nope.safetensors", "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_cli(empty, "-o", out), "empty", "no checkpoints in this directory")
    (empty / "notes.txt").write_text("hello")
    assert_clean_error(run_cli(empty, "-o", out), "no checkpoints")
    assert_clean_error(run_cli(str(good / "*.bin"), "-o", out), "*.bin", "no checkpoints match")
    assert_clean_error(run_cli(empty / "notes.txt", "-o", out), "notes.txt", "not a checkpoint")
    no_output(tmp_path / "out")
    # a quoted glob is expanded by ema-avg itself
    assert run_cli(str(good / "ckpt-*.safetensors"), "-o", out).code == 0


def test_options_that_do_not_fit(good, tmp_path):
    out = tmp_path / "out" / "out.safetensors"
    assert_clean_error(run_cli(good, "-o", out, "--weights", "1"), "1 values for 2 checkpoints", code=2)
    assert_clean_error(run_cli(good, "-o", out, "--weights", "1,-1"), "sum to zero", code=2)
    assert_clean_error(run_cli(good, "-o", out, "--weights", "1,x"), "comma-separated numbers", code=2)
    assert_clean_error(run_cli(good, "-o", out, "--decay", "0.9", "--half-life", "10"), "cannot be combined", code=2)
    assert_clean_error(run_cli(good, "-o", out, "--include", "("), "regular expression", code=2)
    assert_clean_error(run_cli(good, "-o", out, "--bogus"), "--bogus", code=2)
    assert_clean_error(run_cli(good, "-o", out, "--max-shard-size", "lots"), "size", code=2)
    no_output(tmp_path / "out")


def test_output_path_problems(good, tmp_path):
    assert_clean_error(run_cli(good, "-o", good / "ckpt-2.safetensors", "--force"), "one of the inputs")
    assert (good / "ckpt-2.safetensors").stat().st_size > 0 and load_st(good / "ckpt-2.safetensors")[0]["w"][0, 0] == 2
    assert_clean_error(run_cli(good, "-o", tmp_path / "missing" / "o.safetensors"), "missing", "does not exist")
    assert not (tmp_path / "missing").exists()


def _mount_tmpfs(path: Path, opts: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"this test mounts a tmpfs and needs root: {r.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "size=96k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


@pytest.fixture
def readonly_fs(tmp_path):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "ro,size=64k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_leaves_nothing(tmp_path, small_fs):
    for k in (1, 2):
        save_st(tmp_path / f"c-{k}.safetensors", {"w": np.full((100, 100), k, np.float32)})  # 40 KB each, 80 KB... out 40 KB
    (small_fs / "filler").write_bytes(bytes(70_000))
    res = run_cli(tmp_path / "c-1.safetensors", tmp_path / "c-2.safetensors", "-o", small_fs / "out.safetensors")
    assert_clean_error(res, "No space left on device")
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_unwritable_output_directory(tmp_path, readonly_fs):
    for k in (1, 2):
        save_st(tmp_path / f"c-{k}.safetensors", {"w": np.full(3, k, np.float32)})
    res = run_cli(tmp_path / "c-1.safetensors", tmp_path / "c-2.safetensors", "-o", readonly_fs / "out.safetensors")
    assert_clean_error(res, str(readonly_fs), "not writable")


def _big_run(d: Path, n=4, tensors=40, numel=1 << 19):
    """n checkpoints of tensors x numel float32 (80 MB each by default)."""
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    block = rng.standard_normal(numel).astype(np.float32)
    for k in range(1, n + 1):
        if not (d / f"c-{k}.safetensors").exists():
            save_st(d / f"c-{k}.safetensors", {f"t{i:03d}": block + k + i for i in range(tensors)})
    return sorted(d.glob("c-*.safetensors"))


def _spawn(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ema_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, **kw)


def test_sigkill_at_any_moment_leaves_nothing_or_the_old_file(tmp_path):
    ins = _big_run(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    # a complete run first, to learn how long it takes
    t0 = time.perf_counter()
    assert run_cli(*ins, "-o", out, "--threads", "1").code == 0
    full = time.perf_counter() - t0
    reference = out.read_bytes()
    out.unlink()
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        for previous in (False, True):
            if previous:
                out.write_bytes(b"previous")
            p = _spawn([*ins, "-o", out, "--threads", "1", "--force"])
            time.sleep(full * frac)
            p.send_signal(signal.SIGKILL)
            p.wait()
            if out.exists():
                data = out.read_bytes()
                assert data in (b"previous", reference), (frac, previous, len(data))
                if not previous:
                    assert data == reference  # finished before the kill
            if out.exists():
                out.unlink()
    # the next run clears the leftovers of the killed ones
    assert run_cli(*ins, "-o", out).code == 0
    assert out.read_bytes() == reference
    assert not [p.name for p in tmp_path.iterdir() if ".ema-avg-" in p.name]


def test_ctrl_c_and_sigterm_clean_up(tmp_path):
    ins = _big_run(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    for sig, code, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
        p = _spawn([*ins, "-o", out, "--threads", "1"])
        deadline = time.time() + 60
        while not [q for q in tmp_path.iterdir() if ".ema-avg-" in q.name] and time.time() < deadline:
            time.sleep(0.005)  # until the staging file exists: the run is writing
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        assert p.returncode == code, err
        assert "Traceback" not in err and err.strip() == f"error: {word}", err
        assert not out.exists()
        assert not [q.name for q in tmp_path.iterdir() if ".ema-avg-" in q.name]


def test_two_runs_writing_the_same_output(tmp_path):
    ins = _big_run(tmp_path / "in", n=3, tensors=20)
    out = tmp_path / "out.safetensors"
    a = _spawn([*ins, "-o", out, "--force"])
    b = _spawn([*ins, "-o", out, "--force", "--decay", "0.5"])
    a.communicate(timeout=300)
    b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0
    got, meta = load_st(out)  # one complete output, either run's, never a mix
    mode = json.loads(meta["ema_avg"])["mode"]
    w = [1 / 3] * 3 if mode == "mean" else [0.25, 0.25, 0.5]
    x = [load_st(p)[0]["t005"] for p in ins]
    want = sum(wk * xk.astype(np.float64) for wk, xk in zip(w, x)).astype(np.float32)
    np.testing.assert_allclose(got["t005"], want, rtol=1e-6)
    # without --force, a run that finds the output present refuses, even if it appeared mid-run
    c = _spawn([*ins, "-o", out])
    _, err = c.communicate(timeout=300)
    assert c.returncode == 1 and "exists" in err


def test_verify(good, tmp_path):
    out = tmp_path / "out" / "v.safetensors"
    res = run_cli(good, "-o", out, "--verify", "--json")
    assert res.code == 0, res
    assert "verify_s" in res.json()["timings"]


def test_signaling_nan_and_control_characters_still_give_one_line(tmp_path):
    """Found by the fuzzer: numpy warnings on a signaling NaN, and a tensor name with
    control characters, must not break the one-line error."""
    a = np.ones(4, np.float32)
    b = a.copy()
    b.view(np.uint32)[1] = 0x7FA00000  # a signaling NaN
    save_st(tmp_path / "c-1.safetensors", {"w": a, "x\x1cy": a})
    save_st(tmp_path / "c-2.safetensors", {"w": b, "x\x1cy": a})
    save_st(tmp_path / "d-3.safetensors", {"w": a, "z\rq": a})
    out = tmp_path / "out.safetensors"
    assert_clean_error(run_cli(tmp_path / "c-1.safetensors", tmp_path / "c-2.safetensors", "-o", out), "'w'", "NaN")
    assert "Warning" not in run_cli(tmp_path / "c-1.safetensors", tmp_path / "c-2.safetensors", "-o", out).err
    line = assert_clean_error(run_cli(tmp_path / "c-1.safetensors", tmp_path / "d-3.safetensors", "-o", out), "lacks")
    assert "x\\x1cy" in line and "z\\rq" in line
    assert not out.exists()
