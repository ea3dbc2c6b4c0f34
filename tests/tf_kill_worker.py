"""Fault injection for the TF output's commit (tests/test_tf_safety.py).

Runs ``ema_cli.cli.main(argv)`` with ``TFStaging.commit`` wrapped: when the
real run reaches its commit (everything computed, TensorFlow done), the
output directory is snapshotted and, for K = 1, 2, ..., a forked child redoes
the commit from that snapshot with ``os.replace/rename/link/unlink/rmdir``
patched to SIGKILL the child at its K-th call (the commit code knows nothing
of it).  After each kill the directory is copied to ``RESULTS/K``; the first
K at which the child completes ends the loop (``RESULTS/count`` holds it),
then the real run commits normally.  The child touches only the file system
(no TensorFlow), so forking after TensorFlow's threads started is safe here;
one process pays TensorFlow's import instead of one per K.

With ``EMA_TEST_PAUSE_AT=K`` instead: the run's own commit pauses before its
K-th such call, creates ``RESULTS/paused`` and waits (up to 5 minutes) for
``RESULTS/go``: a second writer can be started exactly mid-commit.

usage: python tf_kill_worker.py RESULTS OUTDIR -- CLI-ARGS...
"""

import os
import shutil
import signal
import sys
import time

results, outdir = sys.argv[1], sys.argv[2]
argv = sys.argv[sys.argv.index("--") + 1:]

from ema_cli import cli  # noqa: E402
from ema_cli.formats import tf_fmt  # noqa: E402

_orig_commit = tf_fmt.TFStaging.commit
_state = {"armed": False, "n": 0, "kill_at": 0}


def _wrap(name):
    real = getattr(os, name)

    def call(*a, **k):
        if _state["armed"]:
            _state["n"] += 1
            if _state["n"] == _state["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            if _state["n"] == _state.get("pause_at"):
                open(os.path.join(results, "paused"), "w").close()
                for _ in range(3000):
                    if os.path.exists(os.path.join(results, "go")):
                        break
                    time.sleep(0.1)
        return real(*a, **k)

    setattr(os, name, call)


for _name in ("replace", "rename", "link", "unlink", "rmdir"):
    _wrap(_name)


def commit(self):
    snap = os.path.join(results, "snapshot")
    shutil.copytree(outdir, snap, symlinks=True)
    k = 1
    while True:
        shutil.rmtree(outdir)
        shutil.copytree(snap, outdir, symlinks=True)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _state.update(armed=True, n=0, kill_at=k)
                _orig_commit(self)
            except BaseException as e:  # an unexpected failure: reported, not a kill
                print(f"commit failed at K={k}: {type(e).__name__}: {e}", file=sys.stderr)
                code = 3
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            shutil.copytree(outdir, os.path.join(results, str(k)), symlinks=True)
            k += 1
            continue
        if os.WEXITSTATUS(status) != 0:
            sys.exit(3)
        with open(os.path.join(results, "count"), "w") as fh:
            fh.write(str(k - 1))
        break
    shutil.rmtree(outdir)
    shutil.copytree(snap, outdir, symlinks=True)
    return _orig_commit(self)


def paused_commit(self):
    _state.update(armed=True, n=0, pause_at=int(os.environ["EMA_TEST_PAUSE_AT"]))
    try:
        return _orig_commit(self)
    finally:
        _state["armed"] = False


tf_fmt.TFStaging.commit = paused_commit if os.environ.get("EMA_TEST_PAUSE_AT") else commit
cli.main(argv)
