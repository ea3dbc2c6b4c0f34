"""Read-ahead from a cold disk: ``Reader.prefetch`` really brings a tensor's
pages into the page cache (checked with ``mincore`` on a file evicted with
``posix_fadvise(DONTNEED)``), and ``execute.ReadAhead`` asks for the inputs in
the order the kernel reads them, never more than ``AHEAD`` bytes ahead of what
the workers have consumed."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ema_cli import execute, formats
from ema_cli.formats.base import Source
from ema_cli.formats.safetensors_fmt import _Map
from ema_cli.planning import Options, make_plan
from ema_cli.readers import ReaderPool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and MADV_WILLNEED: Linux")


def resident(path: Path) -> float:
    """The fraction of the file's pages in the page cache (mincore over a fresh mapping)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        n = (len(m) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        view = np.frombuffer(m, np.uint8)
        assert libc.mincore(ctypes.c_void_p(view.ctypes.data), len(m), vec) == 0, os.strerror(ctypes.get_errno())
        del view
        return sum(v & 1 for v in vec) / n


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_file(tmp_path) -> Path:
    path = tmp_path / "ckpt-1.safetensors"
    rng = np.random.default_rng(0)
    save_file({"big": rng.standard_normal(20 << 20, dtype=np.float32)}, str(path))  # 80 MiB
    evict(path)
    if resident(path) > 0.05:
        pytest.skip(f"the page cache of {path.parent} cannot be dropped here (tmpfs?)")
    return path


def device(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _Map.device_read_ahead(fd)
    finally:
        os.close(fd)


def test_prefetch_reads_the_whole_range_into_the_page_cache(tmp_path, monkeypatch):
    """Linux reads at most max(read_ahead_kb, max_sectors_kb) per MADV_WILLNEED
    (8 MiB here, 128 KiB to a few MiB on other disks) and drops the rest of the
    request; the reader asks in steps of that, so all 40 MiB asked for arrive,
    and nothing beyond them.  (Explicit read-ahead forced: on this device the
    kernel's own may be judged enough, next test.)"""
    monkeypatch.setattr(_Map, "KERNEL_READS_AHEAD", 1 << 62)
    path = cold_file(tmp_path)
    reader = formats.open_reader(Source("safetensors", str(path), (str(path),)))
    try:
        assert reader.prefetch("big", 0, 10 << 20) is True  # the first 40 MiB
        deadline = time.monotonic() + 20
        while resident(path) < 0.49 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        frac = resident(path)
        step = max(device(path))
        # the header's page and one step past the end may come too: not the second half
        assert 0.49 <= frac <= 0.5 + step / (80 << 20) + 0.01, (frac, step)
    finally:
        reader.close()


def test_prefetch_left_to_the_kernel_where_its_read_ahead_is_large(tmp_path):
    """With read_ahead_kb of at least KERNEL_READS_AHEAD the reader asks for
    nothing (page faults read that much around themselves) and says so; with
    less it reads ahead."""
    path = cold_file(tmp_path)
    ra, _ = device(path)
    reader = formats.open_reader(Source("safetensors", str(path), (str(path),)))
    try:
        explicit = ra < _Map.KERNEL_READS_AHEAD
        assert reader.prefetch("big", 0, 10 << 20) is explicit
        time.sleep(1.0)
        assert (resident(path) > 0.4) is explicit, (ra, resident(path))
    finally:
        reader.close()


class RecordingPool(ReaderPool):
    """A real ReaderPool that also records what it was asked to read ahead."""

    def __init__(self):
        super().__init__()
        self.asked: list[tuple[str, str, int, int]] = []
        self.lock = threading.Lock()

    def prefetch(self, source, name, first=0, last=None):
        with self.lock:
            self.asked.append((Path(source.path).name, name, first, last))
        return super().prefetch(source, name, first, last)

    def wait_for(self, n: int) -> list:
        deadline = time.monotonic() + 20
        while len(self.asked) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # (and no more than that)
        with self.lock:
            return list(self.asked)


def checkpoints(tmp_path) -> list[str]:
    mib = 1 << 20
    rng = np.random.default_rng(1)
    paths = []
    for step in (100, 200, 300):
        p = tmp_path / f"ckpt-{step}.safetensors"
        save_file({"a": rng.standard_normal(3 * mib // 4, dtype=np.float32),  # 3 pieces
                   "b": rng.standard_normal(16 << 10, dtype=np.float32),  # 64 KiB: not read ahead
                   "c": rng.standard_normal(2 * mib // 4, dtype=np.float32)}, str(p))  # 2 pieces
        paths.append(str(p))
    return paths


def test_read_ahead_order_and_window(tmp_path, monkeypatch):
    """Pieces of PIECE bytes, every input's piece in turn, tensor after tensor;
    tensors under PREFETCH_MIN left to the kernel; at most AHEAD bytes asked
    beyond what was consumed; nothing more once closed."""
    mib = 1 << 20
    monkeypatch.setattr(_Map, "KERNEL_READS_AHEAD", 1 << 62)  # (whatever this disk's read_ahead_kb)
    monkeypatch.setattr(execute, "AHEAD", 2 * mib)
    monkeypatch.setattr(execute, "PIECE", mib)
    paths = checkpoints(tmp_path)
    pool = RecordingPool()
    plan = make_plan(paths, Options(), pool=pool)
    sources = [ck.source for ck in plan.checkpoints]
    files = [Path(p).name for p in paths]
    q = mib // 4  # elements per piece

    def pieces(name, k, numel):
        return [(f, name, k * q, min((k + 1) * q, numel)) for f in files]

    ahead = execute.ReadAhead(plan, [["a"], ["b"], ["c"]], pool, sources)
    try:
        # a piece is asked for while at most AHEAD (2 MiB) are asked beyond what was consumed:
        # one piece of each input, then it waits
        assert pool.wait_for(3) == pieces("a", 0, 3 * q)
        ahead.consumed("a", 2 * mib)
        assert pool.wait_for(5) == pieces("a", 0, 3 * q) + pieces("a", 1, 3 * q)[:2]
        ahead.consumed("a")  # the rest of a: 9 MiB in all
        want = pieces("a", 0, 3 * q) + pieces("a", 1, 3 * q) + pieces("a", 2, 3 * q) + pieces("c", 0, 2 * q)
        assert pool.wait_for(12) == want
        ahead.consumed("b")  # not read ahead: counts for nothing
        assert pool.wait_for(12) == want
    finally:
        ahead.close()
    ahead.consumed("c")
    time.sleep(0.2)
    assert pool.asked == want  # closed: nothing more
    assert not ahead.thread.is_alive()


def test_read_ahead_stops_asking_readers_that_do_not_read_ahead(tmp_path, monkeypatch):
    """Each input is asked once; a reader that answers False is not asked again,
    and when none reads ahead the thread ends."""
    monkeypatch.setattr(_Map, "KERNEL_READS_AHEAD", 0)  # the kernel's read-ahead always enough
    monkeypatch.setattr(execute, "PIECE", 1 << 20)
    paths = checkpoints(tmp_path)
    pool = RecordingPool()
    plan = make_plan(paths, Options(), pool=pool)
    ahead = execute.ReadAhead(plan, [["a"], ["b"], ["c"]], pool, [ck.source for ck in plan.checkpoints])
    try:
        ahead.thread.join(20)
        assert not ahead.thread.is_alive()
        assert pool.asked == [(Path(p).name, "a", 0, 1 << 18) for p in paths]
    finally:
        ahead.close()


def test_start_up_reads_the_heads_of_the_input_files(tmp_path):
    """While the CLI imports, a thread asks for the first HEAD bytes of every
    input file on the command line (``_entry.read_heads``): after ``ema-avg
    plan`` on an evicted 80 MiB checkpoint, which itself reads only the
    header, its first 32 MiB are in the page cache."""
    from conftest import run_cli

    from ema_cli import _entry

    path = cold_file(tmp_path)
    res = run_cli("plan", path, "--json")
    assert res.code == 0, res
    want = _entry.HEAD / path.stat().st_size  # 0.4
    deadline = time.monotonic() + 20
    while resident(path) < want - 0.01 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert want - 0.01 <= resident(path) < 0.6, resident(path)
