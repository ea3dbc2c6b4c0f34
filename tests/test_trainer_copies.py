"""The copies trainers keep beside their checkpoints (the best so far, the last)
are the same training state as one of the checkpoints: in a run directory they
are left out with a warning, not averaged twice and not a duplicate-step error.

Written by the real APIs: Keras 3 ``fit`` with ``ModelCheckpoint`` (periodic,
plus ``save_best_only=True``); PyTorch training saved in timm's
``CheckpointSaver`` layout (``checkpoint-E.pth.tar``, copied to
``model_best.pth.tar`` and ``last.pth.tar`` as timm does, with a file copy)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import assert_clean_error, run_cli, save_st


def _copy_warning(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "left out a trainer's copy of another checkpoint" in ln]


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((64, 4)).astype("float32")
    y = np.random.default_rng(1).random((64, 1)).astype("float32")
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    m.compile("adam", "mse")
    run = tmp_path_factory.mktemp("keras") / "run"
    run.mkdir()
    cbs = [keras.callbacks.ModelCheckpoint(str(run / "w.{epoch:02d}.weights.h5"), save_weights_only=True),
           keras.callbacks.ModelCheckpoint(str(run / "best.weights.h5"), save_weights_only=True,
                                           save_best_only=True, monitor="loss")]
    m.fit(x, y, epochs=4, batch_size=16, callbacks=cbs, verbose=0)
    assert {p.name for p in run.iterdir()} == {"w.01.weights.h5", "w.02.weights.h5", "w.03.weights.h5",
                                                "w.04.weights.h5", "best.weights.h5"}
    return run


def test_keras_save_best_only_copy_is_left_out(keras_run, tmp_path):
    res = run_cli("plan", keras_run, "--json")
    assert res.code == 0, res
    doc = res.json()
    assert [os.path.basename(c["path"]) for c in doc["checkpoints"]] == [f"w.0{e}.weights.h5" for e in (1, 2, 3, 4)]
    # best.weights.h5 is one epoch's state again: its optimizer's step counter equals that file's
    warned = _copy_warning(res.err)
    assert len(warned) == 1 and "best.weights.h5" in warned[0] and ".weights.h5 (step" in warned[0], res.err
    assert any(f"as {keras_run / f'w.0{e}.weights.h5'}" in warned[0] for e in (1, 2, 3, 4)), res.err
    # averaging the directory is the average of the four periodic files
    a, b = tmp_path / "dir.weights.h5", tmp_path / "files.weights.h5"
    assert run_cli(keras_run, "-o", a, "--quiet").code == 0
    assert run_cli(*sorted(keras_run.glob("w.*.weights.h5")), "-o", b, "--quiet").code == 0
    import h5py

    def values(p):
        out = {}
        with h5py.File(p, "r") as h:
            h.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return out

    va, vb = values(a), values(b)
    assert va.keys() == vb.keys() and all(np.array_equal(va[k], vb[k]) for k in va)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(16, 4), torch.rand(16, 1)
    run = tmp_path_factory.mktemp("timm") / "output"
    run.mkdir()
    saved = []
    for epoch in range(3):
        for _ in range(4):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
        state = {"epoch": epoch, "arch": "mlp", "state_dict": m.state_dict(), "optimizer": opt.state_dict(),
                 "version": 2, "metric": float(epoch)}
        f = run / f"checkpoint-{epoch}.pth.tar"
        torch.save(state, f)
        shutil.copyfile(f, run / "last.pth.tar")
        if epoch == 1:
            shutil.copyfile(f, run / "model_best.pth.tar")
        saved.append({k: v.detach().numpy().copy() for k, v in m.state_dict().items()})
    return run, saved


def test_timm_best_and_last_copies_are_left_out(timm_run, tmp_path):
    run, saved = timm_run
    out = tmp_path / "avg.safetensors"
    res = run_cli(run, "-o", out, "--json")
    assert res.code == 0, res
    assert [os.path.basename(c["path"]) for c in res.json()["checkpoints"]] == \
        [f"checkpoint-{e}.pth.tar" for e in range(3)]
    warned = _copy_warning(res.err)
    assert len(warned) == 1 and "model_best.pth.tar" in warned[0] and "last.pth.tar" in warned[0], res.err
    from conftest import load_st

    got, _ = load_st(out)
    for k, v in got.items():
        np.testing.assert_array_equal(v, (sum(s[k].astype(np.float64) for s in saved) / 3).astype(np.float32))
    # named alone, a copy is an input like any other
    res = run_cli("plan", run / "model_best.pth.tar", "--json")
    assert res.code == 0 and len(res.json()["checkpoints"]) == 1, res


def test_equal_steps_without_a_copy_name(tmp_path):
    """Two checkpoints at one step, neither named as a copy: an error whose
    hint works; --order given then averages both (a schedule over steps
    still needs distinct steps)."""
    for name, v in (("a-5.safetensors", 1.0), ("b-5.safetensors", 3.0)):
        save_st(tmp_path / name, {"w": np.full(2, v, np.float32)})
    ins = [tmp_path / "a-5.safetensors", tmp_path / "b-5.safetensors"]
    res = run_cli(*ins, "-o", tmp_path / "out.safetensors")
    assert_clean_error(res, "same step 5", "--order given", code=1)
    out = tmp_path / "given.safetensors"
    res = run_cli(*ins, "--order", "given", "-o", out, "--quiet")
    assert res.code == 0, res
    from conftest import load_st

    assert load_st(out)[0]["w"].tolist() == [2.0, 2.0]
    res = run_cli(*ins, "--order", "given", "--half-life", "3", "-o", tmp_path / "hl.safetensors")
    assert_clean_error(res, "same step 5", "distinct steps", code=1)
