"""Issue 11 item 3: --verify checks the staged output before the commit, so a failed
check (here: a byte flipped on its way to disk, injected into the real writer in a
subprocess) exits 1 with nothing new at the output path."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import FIXTURES, ROOT, assert_clean_error, CliResult

FLIP = r"""
import os, sys
from ema_cli.formats import safetensors_fmt as st
orig = st._FileWriter.close
def close(self):
    # a disk or driver fault: the last data byte of the file changes after it was written
    b = os.pread(self.fd, 1, self.total - 1)
    os.pwrite(self.fd, bytes([b[0] ^ 0xFF]), self.total - 1)
    orig(self)
st._FileWriter.close = close
from ema_cli._entry import main
sys.argv = ["ema-avg", *sys.argv[1:]]
main()
"""  # (also tests/test_scale.py's, on an S3 output)


def run_flipped(*args) -> CliResult:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return CliResult(subprocess.run([sys.executable, "-c", FLIP, *map(str, args)], capture_output=True, text=True,
                                    env=env, stdin=subprocess.DEVNULL, timeout=300))


def test_failed_verify_leaves_nothing_at_the_output(tmp_path):
    out = tmp_path / "avg.safetensors"
    res = run_flipped(FIXTURES / "safetensors", "-o", out, "--verify")
    assert_clean_error(res, "verify: values differ", str(out), code=1)
    assert os.listdir(tmp_path) == []
    # an existing output survives a failed --force --verify untouched
    out.write_bytes(b"previous")
    res = run_flipped(FIXTURES / "safetensors", "-o", out, "--verify", "--force")
    assert_clean_error(res, "verify: values differ")
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["avg.safetensors"]
    # sharded directory output
    d = tmp_path / "shards"
    res = run_flipped(FIXTURES / "safetensors", "-o", d, "--max-shard-size", "200B", "--verify")
    assert_clean_error(res, "verify: values differ")
    assert not d.exists() and os.listdir(tmp_path) == ["avg.safetensors"]
    # without the fault, the same command verifies and commits
    from conftest import run_cli

    res = run_cli(FIXTURES / "safetensors", "-o", d, "--max-shard-size", "200B", "--verify", "--json")
    assert res.code == 0, res
    assert "verify_s" in res.json()["timings"] and (d / "model.safetensors.index.json").exists()


def test_output_header_stays_within_safetensors_limit(tmp_path):
    """Issue 11 item 4: inputs whose header is just under safetensors' 100 MB limit
    (a huge __metadata__ value, kept in the output) plus the recipe would exceed it:
    the recipe is trimmed or left out with a warning, and safetensors opens the output."""
    import numpy as np
    from safetensors import safe_open

    from conftest import save_st, run_cli

    big = "x" * 99_999_800  # the input header: just under the limit
    for k in (1, 2):
        save_st(tmp_path / f"ckpt-{k}.safetensors", {"w": np.full(4, k, np.float32)}, metadata={"notes": big})
    out = tmp_path / "avg.safetensors"
    res = run_cli(tmp_path / "ckpt-1.safetensors", tmp_path / "ckpt-2.safetensors", "-o", out)
    assert res.code == 0, res
    assert "recipe" in res.err and "limit" in res.err
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata()["notes"] == big
        assert f.get_tensor("w").tolist() == [1.5] * 4
