"""TensorFlow outputs and inputs under faults and hostile files (issue 11, TF parts).

Real TensorFlow checkpoints (``fixtures/tf2``: a ``tf.train.Checkpoint`` run)
in, real TensorFlow (``tf.train.load_checkpoint``) as the oracle.  The commit is
killed with SIGKILL at every file-system call it makes
(``tests/tf_kill_worker.py``), and the next run of the same command is checked.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, ROOT, assert_clean_error, run_cli, save_st

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

INPUTS = [str(FIXTURES / "tf2" / f"ckpt-{k}") for k in (1, 2, 3)]
WORKER = Path(__file__).with_name("tf_kill_worker.py")


@pytest.fixture(scope="module")
def tf():
    from ema_cli.formats.tf_fmt import import_tf

    return import_tf()


def values(tf, prefix) -> dict[str, bytes]:
    """Every tensor of a checkpoint as TensorFlow reads it (bytes, to compare exactly)."""
    r = tf.train.load_checkpoint(str(prefix))
    out = {}
    for k in r.get_variable_to_shape_map():
        v = r.get_tensor(k)
        out[k] = v if isinstance(v, bytes) else np.ascontiguousarray(v).tobytes()
    return out


def main_in_process(args, env=None) -> int:
    """The CLI's own ``main`` in this process (TensorFlow is already imported here)."""
    from ema_cli import cli

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        cli.main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        from ema_cli.notices import set_quiet

        set_quiet(False)  # --quiet is process-wide state
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
    return 0


def visible(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# --------------------------------------------------------------------------- 1. atomic commit


def _reference(tf, tmp: Path, inputs, batch: str) -> dict[str, bytes]:
    d = tmp / f"ref-{len(list(tmp.iterdir()))}"
    d.mkdir()
    assert main_in_process([*inputs, "-o", d / "m.ckpt", "--quiet"], {"EMA_AVG_TF_BATCH_BYTES": batch}) == 0
    return values(tf, d / "m.ckpt")


VARIANTS = {
    # name: (old checkpoint's inputs and batch bytes, or None; --force)
    "new": (None, False),
    "force-same-names": ((INPUTS[:2], "1"), True),  # old and new data files have the same names
    "force-other-count": ((INPUTS[:2], str(1 << 30)), True),  # old: 1 data file, new: one per tensor
}


def test_commit_killed_at_every_call(tf, tmp_path, capsys):
    """SIGKILL at each replace/rename/link/unlink/rmdir of the commit, with and
    without --force over an old checkpoint (other values): afterwards the prefix
    holds nothing, the old checkpoint or the new one, each read whole by
    TensorFlow with its exact values; the next run of the same command
    completes (or, without --force, finds the complete new output and refuses),
    leaving no hidden files behind."""
    new_ref = _reference(tf, tmp_path.joinpath("refs") if tmp_path.joinpath("refs").mkdir() is None else None,
                         INPUTS, "1")
    jobs = {}
    for name, (old, force) in VARIANTS.items():
        base = tmp_path / name
        out = base / "out"
        out.mkdir(parents=True)
        old_ref = None
        if old is not None:
            old_ref = _reference(tf, tmp_path / "refs", old[0], old[1])
            assert main_in_process([*old[0], "-o", out / "m.ckpt", "--quiet"],
                                   {"EMA_AVG_TF_BATCH_BYTES": old[1]}) == 0
        args = [*INPUTS, "-o", out / "m.ckpt", "--quiet", *(["--force"] if force else [])]
        (base / "results").mkdir()
        jobs[name] = (base, out, args, old_ref, force)
    capsys.readouterr()

    def launch(job):
        base, out, args, _, _ = job
        env = dict(os.environ, EMA_AVG_TF_BATCH_BYTES="1", PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, str(WORKER), str(base / "results"), str(out), "--", *map(str, args)],
                              env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(2) as ex:
        procs = dict(zip(jobs, ex.map(launch, jobs.values())))
    for name, (base, out, args, old_ref, force) in jobs.items():
        proc = procs[name]
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        count = int((base / "results" / "count").read_text())
        assert count >= (8 if force else 4), (name, count)
        assert values(tf, out / "m.ckpt") == new_ref  # the worker's own final, normal commit
        seen = set()
        for k in range(1, count + 1):
            d = base / "results" / str(k)
            index = d / "m.ckpt.index"
            if not index.exists():
                state = "nothing"
                with pytest.raises(Exception):
                    tf.train.load_checkpoint(str(d / "m.ckpt"))
            else:
                got = values(tf, d / "m.ckpt")
                state = "new" if got == new_ref else "old" if got == old_ref else "MIX"
            assert state != "MIX", (name, k, visible(d))
            seen.add(state)
            capsys.readouterr()
            rc = main_in_process([a if a != out / "m.ckpt" else d / "m.ckpt" for a in args],
                                 {"EMA_AVG_TF_BATCH_BYTES": "1"})
            err = capsys.readouterr().err
            if rc != 0:  # only a run without --force that finds the new output complete
                assert not force and state == "new" and "output exists" in err, (name, k, err)
            assert values(tf, d / "m.ckpt") == new_ref, (name, k)
            assert [f for f in visible(d) if f.startswith(".")] == [], (name, k, visible(d))
            assert "Traceback" not in err
        want = {"new", "nothing"} if old_ref is None else {"old", "nothing", "new"}
        assert seen == want, (name, seen)


def test_concurrent_force_writers(tf, tmp_path):
    """Two --force runs onto one output, different inputs, the second started
    while the first is paused in the middle of its commit: both finish (the
    output's lock makes the second wait for the first), and the output is
    exactly one of the two results, with no other files."""
    import time

    refs = tmp_path / "refs"
    refs.mkdir()
    a, b = INPUTS[:2], INPUTS[1:]
    want = [_reference(tf, refs, a, "1"), _reference(tf, refs, b, "1")]
    out = tmp_path / "out"
    out.mkdir()
    assert main_in_process([INPUTS[0], "-o", out / "m.ckpt", "--quiet", "--allow-copy-only"]) == 0  # an old output
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), EMA_AVG_TF_BATCH_BYTES="1")
    first = subprocess.Popen([sys.executable, str(WORKER), str(ctl), str(out), "--", *a, "-o", str(out / "m.ckpt"),
                              "--force"], env=dict(env, EMA_TEST_PAUSE_AT="4"), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (ctl / "paused").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (ctl / "paused").exists(), first.communicate()[1]
    err2 = (tmp_path / "second.err").open("w+")
    second = subprocess.Popen([sys.executable, "-m", "ema_cli", *b, "-o", str(out / "m.ckpt"), "--force"],
                              env=env, stderr=err2, text=True)
    while second.poll() is None and "waiting" not in (tmp_path / "second.err").read_text() \
            and time.time() < deadline:
        time.sleep(0.1)
    (ctl / "go").touch()
    codes = [first.wait(timeout=300), second.wait(timeout=300)]
    errs = [first.stderr.read(), (tmp_path / "second.err").read_text()]
    assert codes == [0, 0], errs
    assert values(tf, out / "m.ckpt") in want
    assert "another ema-avg run is writing this output" in errs[1]
    assert [f for f in visible(out) if f.startswith(".")] == []


def test_orphans_not_ours_are_never_deleted(tf, tmp_path):
    """Data files with no .index and no ema-avg journal (another tool's half
    written checkpoint): refused even with --force, and kept."""
    out = tmp_path / "out"
    out.mkdir()
    assert main_in_process([*INPUTS, "-o", out / "m.ckpt", "--quiet"]) == 0
    (out / "m.ckpt.index").unlink()
    before = visible(out)
    res = run_cli(*INPUTS, "-o", out / "m.ckpt", "--force")
    assert_clean_error(res, "m.ckpt", "ema-avg did not provably write", "never deletes")
    assert visible(out) == before


# --------------------------------------------------------------------------- 2. hostile index, names


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = _crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _snappy_literals(data: bytes) -> bytes:
    """Valid snappy (raw format) holding ``data`` as literal runs: no library needed."""
    out = bytearray()
    n = len(data)
    while True:  # varint length
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    for i in range(0, len(data), 60):
        chunk = data[i:i + 60]
        out.append((len(chunk) - 1) << 2)
        out += chunk
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _block(entries) -> bytes:
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1)  # one restart point at 0


def _sstable(entries, compress_data: bool) -> bytes:
    """A LevelDB table as TensorFlow's reader reads it: one data block (snappy
    compressed if asked), an empty metaindex block, an index block, the footer."""
    out = bytearray()

    def put(contents: bytes, kind: int) -> bytes:
        handle = _varint(len(out)) + _varint(len(contents))
        out.extend(contents + bytes([kind]) + struct.pack("<I", _masked(contents + bytes([kind]))))
        return handle

    raw = _block(entries)
    data = put(_snappy_literals(raw) if compress_data else raw, 1 if compress_data else 0)
    meta = put(_block([]), 0)
    index = put(_block([(entries[-1][0] + b"\xff", data)]), 0)
    footer = (meta + index).ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    return bytes(out + footer)


def _entries(tf, prefix: str):
    from ema_cli.formats.tf_bundle import read_table

    return read_table(Path(prefix + ".index").read_bytes())


def test_compressed_index_with_a_negative_dimension(tf, tmp_path):
    """A snappy-compressed .index block (TensorFlow reads those) holding an entry
    with a negative dimension makes TensorFlow abort the process (checked here:
    rc 134 in a subprocess).  ema-avg decompresses and checks it (with cramjam),
    or refuses what it cannot check: a one-line error either way, no abort."""
    from tensorflow.core.protobuf import tensor_bundle_pb2

    d = tmp_path / "run"
    shutil.copytree(FIXTURES / "tf2", d)
    prefix = str(d / "ckpt-3")
    entries = _entries(tf, prefix)
    assert entries and entries[0][0] == b""
    # first the same table, compressed but valid: TensorFlow reads it as it was
    good = tmp_path / "good"
    shutil.copytree(FIXTURES / "tf2", good)
    Path(str(good / "ckpt-3") + ".index").write_bytes(_sstable(entries, compress_data=True))
    assert values(tf, good / "ckpt-3") == values(tf, FIXTURES / "tf2" / "ckpt-3")
    bad = []
    for k, v in entries:
        e = tensor_bundle_pb2.BundleEntryProto.FromString(v) if k else None
        if e is not None and k == b"w/.ATTRIBUTES/VARIABLE_VALUE":
            e.shape.dim[0].size = -4
            v = e.SerializeToString()
        bad.append((k, v))
    table = _sstable(bad, compress_data=True)
    Path(prefix + ".index").write_bytes(table)
    from ema_cli.formats.tf_bundle import TableError, read_table

    corrupt = bytearray(table)
    corrupt[5] ^= 0x40  # inside the compressed block: its checksum no longer matches
    with pytest.raises(TableError, match="block checksum mismatch"):
        read_table(bytes(corrupt))
    probe = subprocess.run([sys.executable, "-c", "import sys, tensorflow as tf; "
                            "tf.train.load_checkpoint(sys.argv[1]).get_tensor('w/.ATTRIBUTES/VARIABLE_VALUE')",
                            prefix], capture_output=True, text=True, timeout=300)
    assert probe.returncode == -6 or probe.returncode == 134, probe  # TensorFlow itself aborts
    res = run_cli(str(d / "ckpt-2"), prefix, "-o", tmp_path / "o.safetensors")
    try:
        import cramjam  # noqa: F401

        assert_clean_error(res, "ckpt-3.index", "invalid shape")
    except ImportError:
        assert_clean_error(res, "ckpt-3.index", "snappy-compressed", "pip install cramjam")
    assert not (tmp_path / "o.safetensors").exists()


def test_empty_tensor_name_refused_for_tf_output(tmp_path):
    """A tensor named "" (the bundle's header key: TensorFlow aborts on it) cannot
    be written to a TF output: a one-line error before any work, naming the
    checkpoint that holds it (the engine refuses it for every output format;
    ``validate_names`` below is the TF writer's own guard), nothing left."""
    for k in (1, 2):
        save_st(tmp_path / f"s-{k}.safetensors", {"": np.full(3, k, np.float32), "a": np.ones(2, np.float32)})
    out = tmp_path / "out"
    out.mkdir()
    res = run_cli(tmp_path / "s-1.safetensors", tmp_path / "s-2.safetensors", "-o", out / "m.ckpt")
    assert_clean_error(res, "empty name", "s-2.safetensors")
    assert visible(out) == []


def test_validate_names():
    from ema_cli.errors import EmaError
    from ema_cli.formats.tf_fmt import validate_names

    validate_names(["a", "model/x/.ATTRIBUTES/VARIABLE_VALUE", "ü"])
    for bad in ("", "\x00x", "x\ud800y"):
        with pytest.raises(EmaError):
            validate_names(["a", bad], path="o.ckpt")


# --------------------------------------------------------------------------- 3. state files naming deleted checkpoints


def test_state_file_naming_deleted_checkpoints(tf, tmp_path, capsys):
    """A state file naming 4 checkpoints, 2 of them deleted: an error naming one
    (not a silent average of the other 2); with skip_missing, a warning naming
    each and the 2 present."""
    from ema_cli.errors import EmaError
    from ema_cli.formats.tf_fmt import claim_path

    run = tmp_path / "run"
    ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
    mgr = tf.train.CheckpointManager(ckpt, str(run), max_to_keep=4)
    for _ in range(4):
        mgr.save()
    for k in (1, 3):
        for f in run.glob(f"ckpt-{k}.*"):
            f.unlink()
    state = run / "checkpoint"
    with pytest.raises(EmaError, match=r"ckpt-1 \(and 1 more\).*missing.*--skip-missing"):
        claim_path(state)
    capsys.readouterr()
    got = claim_path(state, skip_missing=True)
    assert sorted(Path(s.path).name for s in got) == ["ckpt-2", "ckpt-4"]
    err = capsys.readouterr().err
    assert "ckpt-1" in err and "ckpt-3" in err and err.count("warning: ") == 2
    res = run_cli(state, "-o", tmp_path / "o.safetensors")
    assert_clean_error(res, str(state), "ckpt-1", "missing")
    res = run_cli(state, "-o", tmp_path / "o.safetensors", "--skip-missing", "--json")
    assert res.code == 0, res
    assert "ckpt-1" in res.err and "ckpt-3" in res.err
    assert [os.path.basename(c["path"]) for c in res.json()["checkpoints"]] == ["ckpt-2", "ckpt-4"]


# --------------------------------------------------------------------------- 4. smaller items


def test_foreign_state_file_needs_force(tf, tmp_path):
    """A ``checkpoint`` state file in the output directory that names only
    deleted checkpoints (another tool's) is not replaced without --force; one
    naming only this output is."""
    out = tmp_path / "out"
    out.mkdir()
    state = out / "checkpoint"
    state.write_text('model_checkpoint_path: "gone-7"\nall_model_checkpoint_paths: "gone-7"\n')
    res = run_cli(*INPUTS, "-o", out / "m.ckpt")
    assert_clean_error(res, str(state), "replacing it needs --force")
    assert visible(out) == ["checkpoint"]
    assert main_in_process([*INPUTS, "-o", out / "m.ckpt", "--force", "--quiet"]) == 0
    assert tf.train.latest_checkpoint(str(out)) == str(out / "m.ckpt")
    assert main_in_process([*INPUTS, "-o", out / "m.ckpt", "--force", "--quiet"]) == 0  # names only this output


def test_full_disk_fails_before_the_work_and_names_the_output(tmp_path):
    """The output's space is reserved first: a file-size limit (EFBIG, as a full
    disk gives ENOSPC) fails before any tensor is computed, naming the output,
    not the hidden staging path, and leaves nothing."""
    import resource
    import signal

    for k in (1, 2):
        save_st(tmp_path / f"s-{k}.safetensors", {"w": np.full((512, 1024), k, np.float32)})  # 2 MiB
    out = tmp_path / "out"
    out.mkdir()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "ema_cli", str(tmp_path / "s-1.safetensors"),
                           str(tmp_path / "s-2.safetensors"), "-o", str(out / "m.ckpt")],
                          env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit)

    class R:
        code, out, err = proc.returncode, proc.stdout, proc.stderr

        def __repr__(self):
            return proc.stderr

    line = assert_clean_error(R(), f"{out / 'm.ckpt'}: not enough space for the output")
    assert "ema-avg-" not in line
    assert visible(out) == []
