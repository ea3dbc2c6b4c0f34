"""Checkpoints written by Accelerate's ``save_state``: real training with
``Accelerator`` and ``ProjectConfiguration(automatic_checkpoint_naming=True)``,
which writes ``checkpoints/checkpoint_N/`` holding the model
(``model.safetensors``, or ``pytorch_model.bin`` without safe serialization)
beside ``optimizer.bin``, ``scheduler.bin`` and ``random_states_0.pkl``.

The run directory averages the models, in save order, and nothing else; the
oracle is the float64 mean of the state dicts the training loop held at each
save, rounded once; the output loads into the model with ``load_state_dict``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_error, load_st, run_cli

pytest.importorskip("accelerate")


def _train(root: Path, *, safe: bool, models: int = 1):
    """Four ``save_state`` calls, ten AdamW steps apart; returns the state dicts at each save."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
            for _ in range(models)]
    opt = torch.optim.AdamW([p for n in nets for p in n.parameters()], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    acc = Accelerator(project_config=ProjectConfiguration(project_dir=str(root), automatic_checkpoint_naming=True))
    *nets, opt, sched = acc.prepare(*nets, opt, sched)
    saved = []
    for step in range(1, 41):
        x = torch.randn(4, 8)
        loss = sum(n(x).pow(2).mean() for n in nets)
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 10 == 0:
            acc.save_state(safe_serialization=safe)
            saved.append({k: v.detach().numpy().copy() for k, v in nets[0].state_dict().items()})
    return nets[0], saved


@pytest.fixture(scope="module", params=[True, False], ids=["safetensors", "bin"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("accelerate")
    model, saved = _train(root, safe=request.param)
    ckpts = root / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["checkpoint_0", "checkpoint_1", "checkpoint_2", "checkpoint_3"], names
    files = {p.name for p in (ckpts / "checkpoint_0").iterdir()}
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= files, files
    assert ("model.safetensors" if request.param else "pytorch_model.bin") in files, files
    return {"dir": ckpts, "model": model, "saved": saved, "weights": "model.safetensors" if request.param
            else "pytorch_model.bin"}


def test_the_run_directory_averages_the_models_in_save_order(run, tmp_path):
    out = tmp_path / "avg.safetensors"
    res = run_cli(run["dir"], "-o", out, "--json")
    assert res.code == 0, res
    doc = res.json()
    paths = [c["path"] for c in doc["checkpoints"]]
    assert paths == [str(run["dir"] / f"checkpoint_{i}" / run["weights"]) for i in range(4)], paths
    assert res.err == "", res  # the mean needs no steps: nothing to warn about
    got, _ = load_st(out)
    assert got.keys() == run["saved"][0].keys()
    for k, v in got.items():
        ref = (sum(s[k].astype(np.float64) for s in run["saved"]) / 4).astype(np.float32)
        np.testing.assert_array_equal(v, ref, err_msg=k)
    import torch
    from safetensors.torch import load_file

    run["model"].load_state_dict(load_file(str(out)), strict=True)


def test_per_step_schedules_are_told_the_numbers_are_save_counts(run):
    res = run_cli("plan", run["dir"], "--half-life", "5")
    assert res.code == 0, res
    warned = [ln for ln in res.err.splitlines() if "Accelerate numbers its checkpoint_N" in ln]
    assert len(warned) == 1 and "not by training step" in warned[0], res.err
    res = run_cli("plan", run["dir"], "--decay", "0.5", "--json")
    assert res.code == 0 and not any("Accelerate" in w for w in res.json()["warnings"]), res


def test_two_models_in_one_save_are_named_not_guessed(tmp_path):
    """save_state of two models writes model.safetensors and model_1.safetensors
    in each checkpoint_N: which one to average is the user's choice."""
    _train(tmp_path, safe=True, models=2)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "checkpoint_0" / "model_1.safetensors").is_file()
    res = run_cli(ckpts, "-o", tmp_path / "avg.safetensors")
    assert_clean_error(res, str(ckpts), "checkpoint_0 (2 checkpoints)", code=1)
    res = run_cli(*sorted(str(p) for p in ckpts.glob("checkpoint_*/model_1.safetensors")), "-o",
                  tmp_path / "avg1.safetensors", "--json")
    assert res.code == 0, res
    assert [Path(c["path"]).parent.name for c in json.loads(res.out)["checkpoints"]] == \
        [f"checkpoint_{i}" for i in range(4)]


def test_a_model_n_file_elsewhere_takes_its_own_step(tmp_path):
    """Only in Accelerate's checkpoint_N directories is model_1.safetensors a
    model index: model_900.safetensors in a run directory is step 900."""
    import torch

    for step in (900, 1000, 80):
        torch.save({"w": torch.full((2,), float(step))}, tmp_path / f"pytorch_model_{step}.bin")
    res = run_cli("plan", tmp_path, "--json")
    assert res.code == 0, res
    assert [c["step"] for c in res.json()["checkpoints"]] == [80, 900, 1000], res
