"""Shared test helpers: run the real CLI in a subprocess, write real checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes  # noqa: F401  (safetensors' numpy API needs it for bf16)
import numpy as np
import pytest

from hypothesis import settings as _hyp_settings

# One pytest worker runs TensorFlow tests and torch tests in turn.  With a CUDA
# build of torch (what pip installs), torch's optimizers and transformers import
# torch._dynamo, which imports triton, whose bundled LLVM segfaults on import in
# a process that has loaded TensorFlow (seen in CI: "Fatal Python error:
# Segmentation fault" in triton/knobs.py, the worker lost).  No test needs
# triton (CPU only), so it is made unimportable: torch then reports "no triton".
# ema-avg itself never imports torch._dynamo (torch.load / torch.save don't).
sys.modules.setdefault("triton", None)

# CI replays the same examples every run (no flaky first sightings); locally, new random ones
_hyp_settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return f"<exit {self.code}\nstdout: {self.out[-2000:]}\nstderr: {self.err[-2000:]}>"


def run_cli(*args, cwd=None, env=None, timeout=600) -> CliResult:
    """``python -m ema_cli ARGS`` in a subprocess, exactly as a user runs it."""
    e = dict(os.environ)
    e.pop("EMA_AVG_DEBUG", None)
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "ema_cli", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return CliResult(proc)


def assert_clean_error(res: CliResult, *needles: str, code: int | None = None) -> str:
    """Non-zero exit, exactly one stderr line starting with 'error: ', no traceback."""
    assert res.code != 0, res
    if code is not None:
        assert res.code == code, res
    assert "Traceback" not in res.err, res
    lines = [ln for ln in res.err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res
    for n in needles:
        assert n in lines[0], (n, res)
    return lines[0]


def save_st(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write a safetensors file with the real safetensors library."""
    from safetensors.numpy import save_file

    # (np.ascontiguousarray would turn a 0-d step counter into shape (1,))
    save_file({k: np.require(v, requirements="C") for k, v in tensors.items()}, str(path), metadata=metadata)
    return Path(path)


def load_st(path) -> tuple[dict, dict]:
    """Read a safetensors file with the real safetensors library."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


@pytest.fixture
def cli():
    return run_cli
