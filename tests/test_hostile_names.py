"""Issue 11 item 8: tensor names no reader or writer accepts are refused before any work:
a lone surrogate (the safetensors library refuses it too) and an empty name (TensorFlow
aborts the process on it: ``Check failed: key != kHeaderEntryKey``)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from conftest import assert_clean_error, run_cli


def raw_safetensors(path, name: str, value: float) -> None:
    """A header as json writes it (the safetensors library itself refuses to write these names)."""
    hdr = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    hdr += b" " * (-len(hdr) % 8)
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + np.float32(value).tobytes())


def test_library_refuses_a_lone_surrogate_too(tmp_path):
    from safetensors import safe_open

    raw_safetensors(tmp_path / "a.safetensors", "x\ud800y", 1.0)
    with pytest.raises(Exception):
        with safe_open(str(tmp_path / "a.safetensors"), framework="numpy") as f:
            list(f.keys())


@pytest.mark.parametrize("out", ["o.safetensors", "o.ckpt", "o.h5"])
def test_lone_surrogate_and_empty_names_are_refused(tmp_path, out):
    for k in (1, 2):
        raw_safetensors(tmp_path / f"s-{k}.safetensors", "x\ud800y", k)
        raw_safetensors(tmp_path / f"e-{k}.safetensors", "", k)
    res = run_cli(tmp_path / "s-1.safetensors", tmp_path / "s-2.safetensors", "-o", tmp_path / out)
    assert_clean_error(res, "lone surrogate", "s-1.safetensors")
    res = run_cli(tmp_path / "e-1.safetensors", tmp_path / "e-2.safetensors", "-o", tmp_path / out)
    assert_clean_error(res, "empty name")
    assert sorted(os.listdir(tmp_path)) == ["e-1.safetensors", "e-2.safetensors", "s-1.safetensors", "s-2.safetensors"]
