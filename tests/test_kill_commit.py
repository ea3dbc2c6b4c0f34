"""Issue 11: a run killed (SIGKILL) at any file-system call of its output commit leaves
the output path holding nothing, the old output or the new one, never a mix, and the
next run of the same command succeeds.

The kill is injected into the real CLI in a subprocess: ``os.replace``, ``os.rename``,
``os.link``, ``os.unlink``, ``shutil.rmtree`` and the ``renameat2`` exchange are wrapped
so that the K-th call made after planning SIGKILLs the process, for every K until the
run completes.  (TensorFlow outputs have their own test in test_tf_safety.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, ROOT, CliResult, run_cli

KILL = r"""
import os, shutil, signal, sys
K = int(os.environ["EMA_TEST_KILL_AT"])
count = [0]
def arm(fn):
    def wrapped(*a, **kw):
        count[0] += 1
        if count[0] == K:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **kw)
    return wrapped
from ema_cli import engine, output
orig_run_many = engine.run_many
def run_many(*a, **kw):  # count only the calls of writing and committing, after planning
    for mod, name in ((os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (shutil, "rmtree")):
        setattr(mod, name, arm(getattr(mod, name)))
    if hasattr(output, "_exchange"):
        output._exchange = arm(output._exchange)
    return orig_run_many(*a, **kw)
engine.run_many = run_many
from ema_cli.cli import main
sys.argv = ["ema-avg", *sys.argv[1:]]
main()
"""


def run_killed(k: int, *args) -> CliResult:
    env = dict(os.environ, EMA_TEST_KILL_AT=str(k),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return CliResult(subprocess.run([sys.executable, "-c", KILL, *map(str, args)], capture_output=True, text=True,
                                    env=env, stdin=subprocess.DEVNULL, timeout=300))


def snapshot(path: Path) -> dict | None:
    """What a reader sees at the output path: tensor name -> bytes, or None when absent."""
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    got = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.numpy import load_file

            got.update({k: v.tobytes() for k, v in load_file(str(f)).items()})
        elif f.suffix == ".h5":
            import h5py

            with h5py.File(f, "r") as h:
                h.visititems(lambda n, o: got.__setitem__(n, np.asarray(o).tobytes()) if isinstance(o, h5py.Dataset) else None)
        elif f.name.endswith(".index.json"):
            got["<index>"] = f.read_bytes()
    assert got, f"the output at {path} is there but holds no tensors: {files}"
    return got


CASES = {
    "safetensors": (FIXTURES / "safetensors", "avg.safetensors", []),
    "sharded": (FIXTURES / "safetensors", "avg", ["--max-shard-size", "300B"]),
    "hdf5": (FIXTURES / "h5", "avg.h5", []),
}


@pytest.mark.parametrize("force", [False, True], ids=["fresh", "force"])
@pytest.mark.parametrize("kind", list(CASES))
def test_kill_at_every_commit_step(tmp_path, kind, force):
    src, name, extra = CASES[kind]
    new_args = [src, *extra, "--decay", "0.5"]
    old_args = [src, *extra, "--last-n", "2"]
    ref = tmp_path / "ref"
    ref.mkdir()
    assert run_cli(*new_args, "-o", ref / name, "--quiet").code == 0
    want_new = snapshot(ref / name)
    work = tmp_path / "work"
    out = work / name
    want_old = None
    outcomes = set()
    for k in range(1, 60):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        if force:
            assert run_cli(*old_args, "-o", out, "--quiet").code == 0
            want_old = snapshot(out)
            assert want_old != want_new
        res = run_killed(k, *new_args, "-o", out, *(["--force"] if force else []), "--quiet")
        state = snapshot(out)
        if res.code == 0:
            assert state == want_new
            break
        assert res.code == -9, res  # killed, nothing else went wrong
        assert state in (want_old, want_new), f"kill point {k}: a mix at the output"
        outcomes.add("old" if state == want_old and force else ("none" if state is None else "new"))
        # the next run of the same command succeeds and leaves the new output
        res = run_cli(*new_args, "-o", out, "--force", "--quiet")
        assert res.code == 0, (k, res)
        assert snapshot(out) == want_new
        leftovers = [p.name for p in work.iterdir() if p.name.startswith(".") and "ema-avg" in p.name]
        assert leftovers == [], (k, leftovers)
    else:
        pytest.fail("the run never completed")
    assert k > 1 and outcomes, "no kill point was exercised"
