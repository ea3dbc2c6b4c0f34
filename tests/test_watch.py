"""``--watch DIR`` (issue 14): the running average after each new checkpoint
equals the batch ``average`` over the checkpoints so far (bit for bit for the
mean, within float64 rounding for EMA and per-step EMA); killed at any point,
the output is the previous complete average; SIGTERM and --until-step stop it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest

import ema_cli
from conftest import load_st, save_st


def write_atomically(d, name, tensors):
    tmp = d.parent / f".{name}.partial"
    save_st(tmp, tensors)
    os.rename(tmp, d / name)
    return d / name


def checkpoint(rng, step, dtype=np.float32):
    return {"enc/kernel": rng.standard_normal((16, 8)).astype(dtype), "enc/bias": rng.standard_normal(8).astype(dtype),
            "global_step": np.array(step, np.int64)}


def n_averaged(out) -> int:
    try:
        _, meta = load_st(out)
    except Exception:  # noqa: BLE001 (not there yet)
        return 0
    return len(json.loads(meta["ema_avg"])["checkpoints"])


def wait_for(pred, timeout=30.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.mark.parametrize("mode,kwargs,exact", [
    ("mean", {}, True),
    ("mean-bf16", {}, True),
    ("ema", {"decay": 0.9, "dtype": "float64"}, False),
    ("ema-per-step", {"half_life": 15.0, "dtype": "float64"}, False),
    ("ema-num-updates", {"decay": 0.99, "num_updates": True, "dtype": "float64"}, False),
])
def test_running_average_equals_batch_after_each_checkpoint(tmp_path, mode, kwargs, exact):
    d = tmp_path / "run"
    d.mkdir()
    out = tmp_path / "avg.safetensors"
    rng = np.random.default_rng(7)
    steps = [10, 20, 35, 50, 80, 90]  # uneven gaps (per-step EMA interpolates)
    dtype = ml_dtypes.bfloat16 if mode == "mean-bf16" else np.float32
    updates = []
    stop = threading.Event()
    errors = []

    def watcher():
        try:
            ema_cli.watch(d, out, poll=0.02, stop=stop, on_update=updates.append, **kwargs)
        except Exception as e:  # noqa: BLE001 (reported by the test below)
            errors.append(e)

    th = threading.Thread(target=watcher)
    th.start()
    files = []
    try:
        for k, step in enumerate(steps, 1):
            files.append(write_atomically(d, f"ckpt-{step}.safetensors", checkpoint(rng, step, dtype)))
            wait_for(lambda: len(updates) >= k or errors)
            assert not errors, errors
            batch_out = tmp_path / f"batch-{k}.safetensors"
            batch = ema_cli.average(files, batch_out, **kwargs)
            got, _ = load_st(out)
            want, _ = load_st(batch_out)
            assert updates[-1].weights == pytest.approx(batch.weights, rel=1e-12)
            assert [c.step for c in updates[-1].checkpoints] == steps[:k]
            assert got["global_step"] == step
            for name in ("enc/kernel", "enc/bias"):
                assert got[name].dtype == want[name].dtype
                if exact:
                    assert got[name].tobytes() == want[name].tobytes(), (k, name)
                else:
                    np.testing.assert_allclose(got[name], want[name], rtol=1e-13, atol=1e-15)
    finally:
        stop.set()
        th.join(10)
    assert updates[-1].averaged == 2 and updates[-1].copied == 1


def test_watch_refuses_what_it_cannot_update(tmp_path):
    for kwargs in ({"decay": 0.9, "interp": "bogus"},):
        with pytest.raises(ema_cli.EmaError):
            ema_cli.watch(tmp_path, tmp_path / "o.safetensors", until_step=0, **kwargs)
    from conftest import assert_clean_error, run_cli

    assert_clean_error(run_cli("--watch", tmp_path, "-o", tmp_path / "o.safetensors", "--sigma-rel", "0.1"),
                       "--watch", code=2)
    assert_clean_error(run_cli("--watch", tmp_path, tmp_path, "-o", tmp_path / "o.safetensors"), "one directory",
                       code=2)
    assert_clean_error(run_cli(tmp_path, "-o", tmp_path / "o.safetensors", "--until-step", "3"), "--watch", code=2)


def _start(d, out, *extra):
    env = dict(os.environ)
    env.pop("EMA_AVG_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "ema_cli", "--watch", str(d), "-o", str(out), "--poll", "0.05",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL)


def test_cli_sidecar_killed_anywhere_leaves_the_previous_average(tmp_path):
    """A writer adds checkpoints one by one; the sidecar process is SIGKILLed at a
    random moment after one of them: the output is always a complete average
    (of the checkpoints it records), never partial.  Then SIGTERM ends a second
    sidecar with exit 0 and --until-step a third."""
    d = tmp_path / "run"
    d.mkdir()
    out = tmp_path / "avg.safetensors"
    rng = np.random.default_rng(1)
    files = []
    proc = _start(d, out, "--decay", "0.5", "--dtype", "float64")
    try:
        kill_after = random.Random(0).randint(2, 4)
        for k, step in enumerate((100, 200, 300, 400, 500), 1):
            files.append(write_atomically(d, f"ckpt-{step}.safetensors", checkpoint(rng, step)))
            if k == kill_after:
                time.sleep(random.Random(1).uniform(0.0, 0.15))  # somewhere in the next update (or before it)
                proc.kill()
                break
            wait_for(lambda: n_averaged(out) >= k)
    finally:
        proc.kill()
        proc.wait(10)
    n = n_averaged(out)
    assert n in (kill_after - 1, kill_after), (n, kill_after)
    got, _ = load_st(out)
    want_out = tmp_path / "want.safetensors"
    ema_cli.average(files[:n], want_out, decay=0.5, dtype="float64")
    want, _ = load_st(want_out)
    np.testing.assert_allclose(got["enc/kernel"], want["enc/kernel"], rtol=1e-13)
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert "avg.safetensors" in visible  # staging files are hidden and removed by the next run

    # a new sidecar picks the run up from the start (the state is in memory), SIGTERM ends it cleanly
    out_b = tmp_path / "avg-b.safetensors"
    proc = _start(d, out_b, "--decay", "0.5", "--dtype", "float64")
    try:
        wait_for(lambda: n_averaged(out_b) == len(files))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "error" not in err, err
    assert not [p for p in tmp_path.iterdir() if ".ema-avg-" in p.name and p.name.endswith(".tmp")]

    # --until-step: exits 0 once that step is averaged; --json prints one line per update
    out2 = tmp_path / "mean.safetensors"
    proc = _start(d, out2, "--until-step", "300", "--json")
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    docs = [json.loads(ln) for ln in stdout.splitlines()]
    assert [len(doc["checkpoints"]) for doc in docs][-1] == 3 and docs[-1]["mode"] == "mean"


def test_incomplete_trainer_checkpoints_wait_for_their_state_file(tmp_path):
    """An HF Trainer checkpoint-N/ is taken once trainer_state.json (written last) is there."""
    d = tmp_path / "out"
    d.mkdir()
    out = tmp_path / "avg.safetensors"
    rng = np.random.default_rng(5)
    updates, stop, returned = [], threading.Event(), []
    # the last update is rendered twice (on_update, then the return value): neither may fail
    th = threading.Thread(target=lambda: returned.append(
        ema_cli.watch(d, out, poll=0.02, stop=stop, on_update=updates.append)))
    th.start()
    try:
        for k, step in enumerate((5, 10), 1):
            ck = d / f"checkpoint-{step}"
            ck.mkdir()
            save_st(ck / "model.safetensors", {"w": rng.standard_normal(4).astype(np.float32)}, {"format": "pt"})
            time.sleep(0.3)  # many polls: the weights alone are not a complete checkpoint
            assert len(updates) == k - 1
            (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            wait_for(lambda: len(updates) == k)
    finally:
        stop.set()
        th.join(10)
    assert [c.step for c in updates[-1].checkpoints] == [5, 10]
    assert updates[-1].files == [str(out)]
    assert len(returned) == 1 and [c.step for c in returned[0].checkpoints] == [5, 10]
    assert returned[0].mode == updates[-1].mode == "mean"


def test_a_layout_to_fix_is_said_once_while_the_sidecar_waits(tmp_path):
    """A directory the sidecar cannot read as one run (a checkpoint at its top
    beside a checkpoint sub-directory) is one warning, not silence and not one
    per poll; the sidecar keeps waiting, and SIGTERM ends it with exit 0."""
    d = tmp_path / "run"
    (d / "checkpoint-200").mkdir(parents=True)
    rng = np.random.default_rng(7)
    save_st(d / "ckpt-100.safetensors", checkpoint(rng, 100))
    save_st(d / "checkpoint-200" / "model.safetensors", checkpoint(rng, 200))
    out = tmp_path / "avg.safetensors"
    proc = _start(d, out)
    try:
        time.sleep(1.5)  # some 30 polls
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "ambiguous directory" in lines[0] \
        and "(--watch keeps waiting)" in lines[0], err
    assert not out.exists()


def test_library_watch_issues_its_warnings_while_it_runs(tmp_path):
    """ema_cli.watch runs until stopped: a checkpoint it skips is an EmaWarning
    at that moment (issued once), not kept for a result that never comes."""
    import warnings

    d = tmp_path / "run"
    d.mkdir()
    rng = np.random.default_rng(8)
    out = tmp_path / "avg.safetensors"
    stop = threading.Event()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = threading.Thread(target=ema_cli.watch, args=(d, out), kwargs={"poll": 0.05, "stop": stop})
        t.start()
        try:
            write_atomically(d, "ckpt-100.safetensors", checkpoint(rng, 100))
            wait_for(lambda: n_averaged(out) == 1)
            final = checkpoint(rng, 0)
            del final["global_step"]
            write_atomically(d, "final.safetensors", final)  # no step in its name or its tensors
            wait_for(lambda: any("final.safetensors" in str(w.message) for w in rec))
            time.sleep(0.3)  # more polls: still one warning
        finally:
            stop.set()
            t.join(30)
    skipped = [w for w in rec if "final.safetensors" in str(w.message)]
    assert len(skipped) == 1 and issubclass(skipped[0].category, ema_cli.EmaWarning), [str(w.message) for w in rec]
    assert "--watch skips it" in str(skipped[0].message)


def test_concurrent_library_calls_keep_their_own_warnings(tmp_path):
    """Two threads averaging at once: each result holds its own warnings only
    (the warnings of a call belong to the call, not to the process)."""
    rng = np.random.default_rng(9)
    files = [save_st(tmp_path / f"ckpt-{s}.safetensors", checkpoint(rng, s)) for s in (100, 200)]
    got = {"one": [], "two": []}
    errors = []

    def run(kind):
        try:
            for i in range(25):
                ins = files[:1] if kind == "one" else files
                got[kind].append(ema_cli.average(ins, tmp_path / f"{kind}-{i}.safetensors").warnings)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ema_cli.EmaWarning)
        threads = [threading.Thread(target=run, args=(k,)) for k in ("one", "two")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert all(len(w) == 1 and "only one checkpoint" in w[0] for w in got["one"]), got["one"]
    assert all(w == [] for w in got["two"]), got["two"]
