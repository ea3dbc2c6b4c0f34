"""A missing optional extra is one line with its install hint, naming what the
user named (an input, the output, the URL), and nothing at the output path.

The real CLI runs in a subprocess with the extra's package shadowed by one
that raises ModuleNotFoundError on import (first on PYTHONPATH), which is what
Python raises when the package is not installed; everything else is the real
installation.  (The TensorBoard extra has its test in test_metrics.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, assert_clean_error, run_cli, save_st


def without(tmp_path: Path, *packages: str) -> dict:
    shim = tmp_path / "not-installed"
    for name in packages:
        (shim / name).mkdir(parents=True, exist_ok=True)
        (shim / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    return {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}


def _no_leftovers(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if "ema-avg" in p.name]
    assert left == [], left


def test_pytorch_output_without_torch_names_the_output(tmp_path):
    out = tmp_path / "avg.pt"
    res = run_cli(FIXTURES / "safetensors", "-o", out, env=without(tmp_path, "torch"))
    line = assert_clean_error(res, f"error: {out}: ", "pip install 'ema-avg[torch]'", code=1)
    assert ".tmp" not in line and "ema-avg-" not in line.split(":")[1], line
    assert not out.exists()
    _no_leftovers(tmp_path)
    # the same run with torch installed writes it
    res = run_cli(FIXTURES / "safetensors", "-o", out, "--quiet")
    assert res.code == 0, res
    import torch

    assert set(torch.load(out, weights_only=True)) >= {"global_step"}


def test_pytorch_input_without_torch_names_the_input(tmp_path):
    import torch

    run = tmp_path / "run"
    run.mkdir()
    for i in (1, 2):
        torch.save({"model": {"w": torch.full((3,), float(i))}, "num_updates": i}, run / f"checkpoint{i}.pt")
    out = tmp_path / "avg.safetensors"
    res = run_cli(run / "checkpoint1.pt", run / "checkpoint2.pt", "-o", out, env=without(tmp_path, "torch"))
    assert_clean_error(res, str(run / "checkpoint1.pt"), "pip install 'ema-avg[torch]'", code=1)
    assert not out.exists()
    res = run_cli(run / "checkpoint1.pt", run / "checkpoint2.pt", "-o", out, "--quiet")
    assert res.code == 0, res


@pytest.mark.parametrize("url", ["s3://bucket/ckpts/", "s3://bucket/ckpt-1.safetensors"])
def test_s3_without_s3fs_names_the_url(tmp_path, url):
    out = tmp_path / "avg.safetensors"
    res = run_cli(url, "-o", out, env=without(tmp_path, "s3fs"))
    assert_clean_error(res, url.rstrip("/"), "pip install 'ema-avg[s3]'", code=1)
    assert not out.exists()


def test_s3_output_without_s3fs_names_the_url(tmp_path):
    res = run_cli(FIXTURES / "safetensors", "-o", "s3://bucket/avg.safetensors", env=without(tmp_path, "s3fs"))
    assert_clean_error(res, "s3://bucket/avg.safetensors", "pip install 'ema-avg[s3]'", code=1)


def test_dask_without_distributed_gives_the_hint(tmp_path):
    for i in (1, 2):
        save_st(tmp_path / f"ckpt-{i}.safetensors", {"w": np.full(4, i, dtype=np.float32)})
    out = tmp_path / "avg"
    res = run_cli(tmp_path / "ckpt-1.safetensors", tmp_path / "ckpt-2.safetensors", "-o", out, "--dask", "local:2",
                  env=without(tmp_path, "distributed"))
    assert_clean_error(res, "--dask", "pip install 'ema-avg[dask]'", code=1)
    assert not out.exists()
