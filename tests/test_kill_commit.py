"""Issue 11: a run killed (SIGKILL) at any file-system call of its output commit leaves
the output path holding nothing, the old output or the new one, never a mix, and the
next run of the same command succeeds.

The kill is injected into the real CLI in a subprocess: ``os.replace``, ``os.rename``,
``os.link``, ``os.unlink``, ``shutil.rmtree`` and the ``renameat2`` exchange are wrapped
so that the K-th call made after planning SIGKILLs the process, for every K until the
run completes.  (TensorFlow outputs have their own test in test_tf_safety.py.)"""

from __future__ import annotations

import json
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


def _commit_case(tmp_path, kind):
    """The commands of a commit test: the new run (an EMA), the old output's
    (--last-n 2, what --force replaces), the new run's output made once
    undisturbed, and the work directory with the output path in it."""
    src, name, extra = CASES[kind]
    new_args = [src, *extra, "--decay", "0.5"]
    old_args = [src, *extra, "--last-n", "2"]
    ref = tmp_path / "ref"
    ref.mkdir()
    assert run_cli(*new_args, "-o", ref / name, "--quiet").code == 0
    work = tmp_path / "work"
    return new_args, old_args, snapshot(ref / name), work, work / name


def _fresh_work(work, out, old_args):
    """An empty work directory, holding the old output when ``old_args`` is
    given (the --force cases); the old output's snapshot, or None."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    if old_args is None:
        return None
    assert run_cli(*old_args, "-o", out, "--quiet").code == 0
    return snapshot(out)


@pytest.mark.parametrize("force", [False, True], ids=["fresh", "force"])
@pytest.mark.parametrize("kind", list(CASES))
def test_kill_at_every_commit_step(tmp_path, kind, force):
    new_args, old_args, want_new, work, out = _commit_case(tmp_path, kind)
    outcomes = set()
    for k in range(1, 60):
        want_old = _fresh_work(work, out, old_args if force else None)
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



# A real SIGINT or SIGTERM (not SIGKILL) at the K-th file-system call after planning,
# sent to the process's own entry point.  Before the commit it unwinds the run: exit
# 130/143, one line, the output path as it was.  From the commit on it is held and
# then ignored: the outputs are all in place and the exit code is 0.  Never both: an
# output in place and a failure reported (a signal between ``os.link`` and the unlink
# of the staging file, or amid the deletion of a replaced output, used to do that).
SIGNAL = KILL.replace("            os.kill(os.getpid(), signal.SIGKILL)",
                      "            open(os.environ['EMA_TEST_SENT'], 'w').close()\n"
                      "            os.kill(os.getpid(), int(os.environ['EMA_TEST_SIGNAL']))")
SIGNAL = SIGNAL.replace("from ema_cli.cli import main", "from ema_cli._entry import main")


@pytest.mark.parametrize("sig,code,message", [(2, 130, "error: interrupted"), (15, 143, "error: terminated")],
                         ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("force", [False, True], ids=["fresh", "force"])
@pytest.mark.parametrize("kind", ["safetensors", "sharded"])
def test_signal_at_every_commit_step_is_success_or_nothing(tmp_path, kind, force, sig, code, message):
    assert "EMA_TEST_SIGNAL" in SIGNAL and "_entry import main" in SIGNAL
    new_args, old_args, want_new, work, out = _commit_case(tmp_path, kind)
    sent = tmp_path / "sent"
    env = dict(os.environ, EMA_TEST_SIGNAL=str(sig), EMA_TEST_SENT=str(sent),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    outcomes = []
    for k in range(1, 80):
        want_old = _fresh_work(work, out, old_args if force else None)
        sent.unlink(missing_ok=True)
        env["EMA_TEST_KILL_AT"] = str(k)
        res = CliResult(subprocess.run([sys.executable, "-c", SIGNAL, *map(str, new_args), "-o", str(out),
                                        *(["--force"] if force else []), "--quiet"],
                                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300))
        state = snapshot(out)
        leftovers = [p.name for p in work.iterdir() if p.name.startswith(".") and "ema-avg" in p.name]
        assert leftovers == [], (k, leftovers)
        if not sent.exists():  # K is past the run's last call: an uninterrupted run
            assert res.code == 0 and state == want_new, (k, res)
            break
        if res.code == 0:
            assert state == want_new, f"signal at call {k}: exit 0 without the new output"
            assert res.err == "", (k, res)
            outcomes.append("held")
        else:
            assert (res.code, res.err.splitlines()) == (code, [message]), (k, res)
            assert state == want_old, f"signal at call {k}: exit {res.code} but the output path changed"
            outcomes.append("before")
    else:
        pytest.fail("the run never completed")
    assert "held" in outcomes, outcomes
    assert outcomes == sorted(outcomes), outcomes  # every signal before the commit fails the run, none after


LINK_SIGNAL = r"""
import os, signal, sys
sig = int(os.environ["EMA_TEST_SIGNAL"])
sent = []
def signalled(fn):  # the commit's own call: os.link (a new file), os.replace (--force, --watch)
    def call(*a, **kw):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), sig)
        return fn(*a, **kw)
    return call
os.link, os.replace = signalled(os.link), signalled(os.replace)
"""


def test_a_library_commit_delivers_its_signal_after_the_outputs_are_in_place(tmp_path):
    """In a program that uses the library, a Ctrl-C during the commit is the program's
    again right after it: the output is complete, then KeyboardInterrupt."""
    out = tmp_path / "avg.safetensors"
    ref = tmp_path / "ref.safetensors"
    assert run_cli(FIXTURES / "safetensors", "--decay", "0.5", "-o", ref, "--quiet").code == 0
    script = LINK_SIGNAL + f"""
import ema_cli
try:
    ema_cli.average({str(FIXTURES / "safetensors")!r}, {str(out)!r}, decay=0.5)
except KeyboardInterrupt:
    print("KeyboardInterrupt", os.path.exists({str(out)!r}))
else:
    print("no interrupt")
"""
    env = dict(os.environ, EMA_TEST_SIGNAL="2", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.stdout.split() == ["KeyboardInterrupt", "True"], res
    assert snapshot(out) == snapshot(ref)


def test_a_sigterm_during_a_watch_update_stops_the_watch_after_that_update(tmp_path):
    """--watch commits once per checkpoint: a SIGTERM during the first update's commit
    ends the sidecar (exit 0, its normal end) with that update in place."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / "safetensors" / "ckpt-1.safetensors", run)
    out = tmp_path / "avg.safetensors"
    env = dict(os.environ, EMA_TEST_SIGNAL="15", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = LINK_SIGNAL + "from ema_cli._entry import main\nsys.argv = ['ema-avg', *sys.argv[1:]]\nmain()\n"
    res = CliResult(subprocess.run([sys.executable, "-c", script, "--watch", str(run), "-o", str(out), "--poll", "0.1",
                                    "--quiet", "--json"], capture_output=True, text=True, env=env,
                                   stdin=subprocess.DEVNULL, timeout=60))
    assert (res.code, res.err) == (0, ""), res
    assert snapshot(out) == snapshot(run / "ckpt-1.safetensors")
    # the update was recorded and reported before the watch stopped: one JSON line for it
    docs = [json.loads(ln) for ln in res.out.splitlines()]
    assert len(docs) == 1 and len(docs[0]["checkpoints"]) == 1, res


HOST = r"""
import asyncio, faulthandler, os, signal, sys, tempfile
import ema_cli
src, out = sys.argv[1], sys.argv[2]
link = os.link
def signalled(*a, **kw):
    os.kill(os.getpid(), signal.SIGTERM)
    return link(*a, **kw)
os.link = signalled
case = os.environ["EMA_TEST_HOST"]
if case == "faulthandler":  # a C-level handler Python cannot put back: left alone
    faulthandler.register(signal.SIGTERM, file=sys.stderr, chain=False)
    ema_cli.average(src, out, decay=0.5)
    os.link = link
    os.kill(os.getpid(), signal.SIGTERM)  # still faulthandler's: a stack dump, and the process goes on
    print("alive", os.path.exists(out))
else:  # asyncio's add_signal_handler (a wakeup fd): its callback runs once
    seen = []
    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: seen.append("TERM"))
        ema_cli.average(src, out, decay=0.5)
        await asyncio.sleep(0.2)
    asyncio.run(main())
    print(len(seen), os.path.exists(out))
"""


@pytest.mark.parametrize("case,want", [("faulthandler", ["alive", "True"]), ("asyncio", ["1", "True"])])
def test_a_host_programs_own_signal_handling_is_left_as_it_was(tmp_path, case, want):
    env = dict(os.environ, EMA_TEST_HOST=case, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", HOST, str(FIXTURES / "safetensors"),
                          str(tmp_path / "avg.safetensors")], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == want, res
