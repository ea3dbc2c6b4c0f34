"""TensorFlow checkpoints (issue 3), against the real TensorFlow.

Runs are generated here with ``fixtures/gen_tf.py``: a TF1 graph-mode run with
TensorFlow's online ExponentialMovingAverage (Saver checkpoint after every
step, step 0 included) and a TF2 ``tf.Module`` run saved with
``tf.train.Checkpoint``.  End-to-end cases run the real CLI in a subprocess
(each pays TensorFlow's ~3 s import, so there are few of them); discovery,
name rules and staging details are checked in-process.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURES, ROOT, assert_clean_error, load_st, run_cli, save_st

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

_spec = importlib.util.spec_from_file_location("gen_tf", FIXTURES / "gen_tf.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

TF1_STEPS = 12  # decay min(0.5, (1+n)/(10+n)): both regimes (n < 8 and n >= 8)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def tf():
    import tensorflow  # noqa: F401  (a test extra: missing it must fail, not skip)
    from ema_cli.formats.tf_fmt import import_tf

    return import_tf()


@pytest.fixture(scope="session")
def tf1_run(tf, tmp_path_factory):
    return gen.train_tf1(tmp_path_factory.mktemp("tf1") / "run", steps=TF1_STEPS)


@pytest.fixture(scope="session")
def tf2_run(tf, tmp_path_factory):
    return gen.train_tf2(tmp_path_factory.mktemp("tf2") / "run", saves=4)


def values(tf, prefix) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint, read by TensorFlow itself."""
    r = tf.train.load_checkpoint(str(prefix))
    return {k: r.get_tensor(k) for k in r.get_variable_to_shape_map()}


def dtypes_of(tf, prefix) -> dict[str, str]:
    r = tf.train.load_checkpoint(str(prefix))
    return {k: v.name for k, v in r.get_variable_to_dtype_map().items()}


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def copy_run(run: dict, dest: Path, keep: list[int] | None = None, meta: bool = True) -> Path:
    """A copy of (some of) a run's checkpoints."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, prefix in enumerate(run["prefixes"]):
        if keep is not None and i not in keep:
            continue
        for f in glob.glob(glob.escape(prefix) + ".*"):
            if f.endswith(".meta") and not meta:
                continue
            shutil.copy(f, dest)
    return dest


# --------------------------------------------------------------------------- TF1: TensorFlow's online EMA


def test_tf1_float64_path_matches_tf_shadows_and_copies_the_rest(tf, tf1_run, tmp_path):
    """Default (float64 weighted sum) path over the directory: the trainable
    variables equal TF's shadows to 1e-6; the BN moving_mean (non-trainable,
    .meta present), Adam slots, beta powers, global_step and the existing
    shadows are copied from the newest checkpoint; stderr stays silent."""
    out = tmp_path / "avg.safetensors"
    res = run_cli(tf1_run["dir"], "-o", out, "--decay", tf1_run["decay"], "--num-updates", "--json")
    assert res.code == 0, res
    assert res.err.strip() == "", res  # no TensorFlow logging, no warnings
    doc = res.json()
    assert doc["tensors"] == {"averaged": 3, "copied": 13, "skipped": []}, doc["tensors"]
    assert [c["step"] for c in doc["checkpoints"]] == list(range(TF1_STEPS + 1))
    assert {c["step_from"] for c in doc["checkpoints"]} == {"tensor"}

    got, _ = load_st(out)
    newest = values(tf, tf1_run["prefixes"][-1])
    for name in tf1_run["averaged"]:
        shadow = newest[name + "/ExponentialMovingAverage"]
        assert got[name].dtype == np.float32
        assert rel_err(got[name], shadow) <= 1e-6, name
        assert rel_err(got[name], newest[name]) > 1e-3, name  # really an average, not the last weights
    for name in ("bn/moving_mean", "dense/kernel/Adam", "dense/kernel/Adam_1", "part/Adam", "beta1_power",
                 "beta2_power", "global_step", "dense/bias/ExponentialMovingAverage", "part/ExponentialMovingAverage"):
        assert bits(got[name]) == bits(newest[name]), name
    assert int(got["global_step"]) == TF1_STEPS


def test_tf1_tf_exact_is_bit_for_bit_from_dir_glob_and_tf_output(tf, tf1_run, tmp_path):
    """--tf-exact equals TensorFlow's shadow variables bit for bit: from the
    directory (safetensors out) and from the shell-ordered glob of every file
    (.index, .data, .meta) with --format tf out, which TensorFlow's Saver
    restores into the original graph (partitioned variable included)."""
    run, decay = tf1_run, str(tf1_run["decay"])
    a = tmp_path / "a.safetensors"
    res = run_cli(run["dir"], "-o", a, "--decay", decay, "--num-updates", "--tf-exact")
    assert res.code == 0, res
    got_a, _ = load_st(a)

    files = sorted(glob.glob(str(run["dir"] / "model.ckpt-*")))  # ckpt-1, ckpt-10, ..., ckpt-2: shell order
    assert len(files) == 3 * (TF1_STEPS + 1)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    prefix = out_dir / "avg"  # no .ckpt suffix: --format tf says it
    res = run_cli(*files, "-o", prefix, "--format", "tf", "--decay", decay, "--num-updates", "--tf-exact",
                  "--verify", "--json")
    assert res.code == 0, res
    doc = res.json()
    assert [c["step"] for c in doc["checkpoints"]] == list(range(TF1_STEPS + 1))
    assert sorted(doc["files"]) == sorted(str(out_dir / f) for f in
                                         ("avg.data-00000-of-00001", "avg.index", "avg.meta", "checkpoint"))
    got_b = values(tf, prefix)

    newest = values(tf, run["prefixes"][-1])
    for name in run["averaged"]:
        shadow = newest[name + "/ExponentialMovingAverage"]
        assert bits(got_a[name]) == bits(shadow), name
        assert bits(got_b[name]) == bits(shadow), name
    assert set(got_b) == set(newest)
    assert dtypes_of(tf, prefix) == dtypes_of(tf, run["prefixes"][-1])
    assert listing(out_dir) == ["avg.data-00000-of-00001", "avg.index", "avg.meta", "checkpoint"]
    assert (out_dir / "avg.meta").read_bytes() == Path(run["prefixes"][-1] + ".meta").read_bytes()
    assert tf.train.latest_checkpoint(str(out_dir)) == str(prefix)

    # TensorFlow's own Saver restores it into the run's graph, partitions included
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        saver = v1.train.import_meta_graph(str(prefix) + ".meta")
        with v1.Session() as sess:
            saver.restore(sess, tf.train.latest_checkpoint(str(out_dir)))
            restored = {v.op.name: sess.run(v) for v in v1.global_variables()}
    whole_part = np.concatenate([restored["part/part_0"], restored["part/part_1"]])
    assert bits(whole_part) == bits(newest["part/ExponentialMovingAverage"])
    assert bits(restored["dense/kernel"]) == bits(newest["dense/kernel/ExponentialMovingAverage"])
    assert restored["global_step"] == TF1_STEPS


def test_tf1_meta_collections_decide_the_averaged_set(tf, tf1_run, tmp_path):
    """With the .meta: exactly trainable + moving_average_variables (BN
    moving_mean copied).  Without it: the name rules (moving_mean averaged,
    slots and shadows still copied).  --include/--exclude override both."""
    from ema_cli import engine
    from ema_cli.formats import resolve_inputs, tf_fmt

    newest = tf1_run["prefixes"][-1]
    assert tf_fmt.read_meta_collections(newest + ".meta") == {
        "trainable_variables": ["dense/kernel", "dense/bias", "part"],
        "moving_average_variables": ["dense/kernel", "dense/bias", "part"],
    }
    [src] = resolve_inputs([newest])
    with tf_fmt.Reader(src) as r:
        assert r.averaged_set() == {"dense/kernel", "dense/bias", "part"}
        avg = {n for n, i in r.tensors().items() if r.averaged_by_default(i)}
        assert avg == {"dense/kernel", "dense/bias", "part"}

    bare = copy_run(tf1_run, tmp_path / "nometa", keep=[TF1_STEPS - 1, TF1_STEPS], meta=False)
    [src] = resolve_inputs([str(bare / f"model.ckpt-{TF1_STEPS}")])
    with tf_fmt.Reader(src) as r:
        assert r.averaged_set() is None
        avg = {n for n, i in r.tensors().items() if r.averaged_by_default(i)}
        assert avg == {"dense/kernel", "dense/bias", "part", "bn/moving_mean"}

    def actions(inputs, **kw):
        plan = engine.make_plan(inputs, engine.Options(**kw))
        return {t.name: t.action for t in plan.tasks}

    with_meta = copy_run(tf1_run, tmp_path / "meta", keep=[TF1_STEPS - 1, TF1_STEPS])
    a = actions([str(with_meta)], include=["^bn/"], exclude=["^dense/bias$"])
    assert a["bn/moving_mean"] == "average" and a["dense/bias"] == "copy" and a["dense/kernel"] == "average"
    a = actions([str(bare)])
    assert a["bn/moving_mean"] == "average" and a["dense/kernel/ExponentialMovingAverage"] == "copy"
    a = actions([str(bare)], suffix="Adam_1")  # the --suffix in use is a shadow too
    assert a["dense/kernel/Adam_1"] == "copy"


# --------------------------------------------------------------------------- TF2: object-based checkpoints


def test_tf2_mean_restores_into_a_fresh_module(tf, tf2_run, tmp_path):
    """TF-format mean of a TF2 run: restores with assert_existing_objects_matched
    (and assert_consumed), values equal the float64 mean rounded once, dtypes
    (float32, bfloat16, int64) kept, the step is the newest.  A tiny batch size
    makes one SaveV2 batch per tensor, joined by MergeV2Checkpoints."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    prefix = out_dir / "mean.ckpt"
    res = run_cli(tf2_run["dir"], "-o", prefix, "--json", env={"EMA_AVG_TF_BATCH_BYTES": "1"})
    assert res.code == 0, res
    doc = res.json()
    assert [(c["step"], c["step_from"]) for c in doc["checkpoints"]] == [(s, "tensor") for s in tf2_run["steps"]]
    assert doc["format"] == "tf"

    newest = tf2_run["prefixes"][-1]
    ins = [values(tf, p) for p in tf2_run["prefixes"]]
    out = values(tf, prefix)
    n_tensors = len(ins[-1])
    data = sorted(f for f in listing(out_dir) if ".data-" in f)
    assert data == [f"mean.ckpt.data-{i:05d}-of-{n_tensors:05d}" for i in range(n_tensors)]
    assert listing(out_dir) == sorted(data + ["mean.ckpt.index", "checkpoint"])  # nothing else left behind
    assert dtypes_of(tf, prefix) == dtypes_of(tf, newest)
    assert out["_CHECKPOINTABLE_OBJECT_GRAPH"] == ins[-1]["_CHECKPOINTABLE_OBJECT_GRAPH"]

    fresh = gen.make_tf2_module()
    status = tf.train.Checkpoint(root=fresh).restore(tf.train.latest_checkpoint(str(out_dir)))
    status.assert_existing_objects_matched()
    status.assert_consumed()
    from ema_cli import dtypes

    for attr, key in (("w", "w"), ("h", "h"), ("head.kernel", "head/kernel")):
        key = f"{key}/.ATTRIBUTES/VARIABLE_VALUE"
        mean = np.mean([np.asarray(i[key], np.float64) for i in ins], axis=0)
        var = fresh.head.kernel if attr == "head.kernel" else getattr(fresh, attr)
        want = dtypes.cast_rounded(mean, dtypes.from_numpy(ins[0][key].dtype))
        assert var.dtype == tf.as_dtype(ins[0][key].dtype)
        assert bits(var.numpy()) == bits(want), attr
    assert fresh.h.dtype == tf.bfloat16 and fresh.step.dtype == tf.int64
    assert int(fresh.step.numpy()) == tf2_run["steps"][-1]


def test_tf_to_safetensors_skips_string_tensors_with_a_notice(tf, tf2_run, tmp_path):
    out = tmp_path / "avg.safetensors"
    res = run_cli(tf2_run["dir"], "-o", out, "--json")
    assert res.code == 0, res
    warns = [ln for ln in res.err.splitlines() if ln.startswith("warning: ")]
    assert len(warns) == 1 and "_CHECKPOINTABLE_OBJECT_GRAPH" in warns[0], res
    assert res.json()["tensors"]["skipped"] == ["_CHECKPOINTABLE_OBJECT_GRAPH"]
    got, _ = load_st(out)
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in got
    assert got["h/.ATTRIBUTES/VARIABLE_VALUE"].dtype == ml_dtypes.bfloat16
    assert int(got["step/.ATTRIBUTES/VARIABLE_VALUE"]) == tf2_run["steps"][-1]
    ins = [values(tf, p) for p in tf2_run["prefixes"]]
    key = "w/.ATTRIBUTES/VARIABLE_VALUE"
    want = np.mean([i[key].astype(np.float64) for i in ins], axis=0).astype(np.float32)
    assert bits(got[key]) == bits(want)


def test_safetensors_to_tf(tf, tmp_path):
    rng = np.random.default_rng(1)
    ins = []
    for k in range(1, 4):
        t = {"enc/w": rng.standard_normal((5, 4)).astype(np.float32),
             "enc/e": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
             "head/b": rng.standard_normal(4).astype(np.float16),
             "ids": np.arange(3, dtype=np.int32) + k,
             "global_step": np.array(10 * k, np.int64)}
        save_st(tmp_path / f"ckpt-{k}.safetensors", t)
        ins.append(t)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = run_cli(*sorted(tmp_path.glob("*.safetensors")), "-o", out_dir / "avg.ckpt")
    assert res.code == 0, res
    got = values(tf, out_dir / "avg.ckpt")
    assert dtypes_of(tf, out_dir / "avg.ckpt") == {"enc/w": "float32", "enc/e": "bfloat16", "head/b": "float16",
                                                   "ids": "int32", "global_step": "int64"}
    from ema_cli import dtypes

    for name in ("enc/w", "enc/e", "head/b"):
        mean = np.mean([t[name].astype(np.float64) for t in ins], axis=0)
        assert bits(got[name]) == bits(dtypes.cast_rounded(mean, dtypes.from_numpy(ins[0][name].dtype))), name
    assert bits(got["ids"]) == bits(ins[-1]["ids"]) and got["global_step"].reshape(-1).tolist() == [30]
    assert tf.train.latest_checkpoint(str(out_dir)) == str(out_dir / "avg.ckpt")


# --------------------------------------------------------------------------- bad input


def test_corrupt_tf_inputs_are_one_line_errors_and_write_nothing(tf, tf1_run, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    # truncated .data of the newest: its step reads, a later tensor does not (fails while writing)
    run = copy_run(tf1_run, tmp_path / "trunc", keep=[0, 1, 2, 3])
    data = run / "model.ckpt-3.data-00000-of-00001"
    os.truncate(data, data.stat().st_size - 16)
    res = run_cli(run, "-o", out_dir / "avg.ckpt")
    assert_clean_error(res, str(data), "truncated", code=1)
    assert listing(out_dir) == []

    # missing .index: named by its data file or its prefix; TensorFlow is not even needed
    run = copy_run(tf1_run, tmp_path / "noindex", keep=[0, 1, 2])
    os.unlink(run / "model.ckpt-1.index")
    res = run_cli(*sorted(glob.glob(str(run / "model.ckpt-*"))), "-o", out_dir / "avg.ckpt")
    assert_clean_error(res, "model.ckpt-1.", "model.ckpt-1.index", "missing", code=1)
    assert listing(out_dir) == []

    # unreadable .meta of the newest (the one that decides the averaged set)
    run = copy_run(tf1_run, tmp_path / "badmeta", keep=[0, 1, 2])
    (run / "model.ckpt-2.meta").write_bytes(b"\xff\xff\xff not a MetaGraphDef")
    res = run_cli(run, "-o", out_dir / "avg.ckpt")
    assert_clean_error(res, str(run / "model.ckpt-2.meta"), ".meta", code=1)
    assert listing(out_dir) == []


def test_corrupt_index_and_missing_data_in_process(tf, tf1_run, tmp_path):
    from ema_cli.errors import EmaError
    from ema_cli.formats import resolve_inputs, tf_fmt

    run = copy_run(tf1_run, tmp_path / "run", keep=[0, 1])
    (run / "model.ckpt-0.index").write_bytes(b"garbage")
    os.unlink(run / "model.ckpt-1.data-00000-of-00001")
    srcs = resolve_inputs([str(run)])
    assert [s.path for s in srcs] == [str(run / "model.ckpt-0"), str(run / "model.ckpt-1")]
    with pytest.raises(EmaError, match=r"model\.ckpt-0\.index: not a readable TensorFlow checkpoint index"):
        tf_fmt.Reader(srcs[0])
    with pytest.raises(EmaError, match=r"model\.ckpt-1: the checkpoint has no data file"):
        tf_fmt.Reader(srcs[1])


def test_tf_checkpoints_average_without_tensorflow(tmp_path):
    """TensorFlow made unimportable in a real subprocess (``sys.modules`` entry
    set to None, so any import of it fails): the TF1 fixtures (``.meta``
    collections, a partitioned variable) and the TF2 fixtures (object graph)
    average to safetensors and to a TF checkpoint, and a corrupt index still
    gives its one-line error.  The outputs are checked by TensorFlow in
    test_tf_bundle.py; here, that no TensorFlow is needed at all."""
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "from ema_cli.cli import main\n"
            "main(sys.argv[1:])\n")

    def run(*args):
        from conftest import CliResult

        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        return CliResult(proc)

    for family in ("tf1", "tf2"):
        for out in (tmp_path / f"{family}.safetensors", tmp_path / f"{family}-out" / "m.ckpt"):
            out.parent.mkdir(exist_ok=True)
            res = run(FIXTURES / family, "-o", out, "--quiet")
            assert res.code == 0, res
            assert res.err.strip() == "", res
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("model.ckpt-1.index", "model.ckpt-1.data-00000-of-00001"):
        (run_dir / name).write_bytes(b"x")
    line = assert_clean_error(run(run_dir, "-o", tmp_path / "x.safetensors"), code=1)
    assert line == (f"error: {run_dir / 'model.ckpt-1.index'}: not a readable TensorFlow checkpoint index: "
                    "1 bytes: too short for a table")


def test_safetensors_only_run_never_imports_tensorflow(tmp_path):
    for k in range(1, 3):
        save_st(tmp_path / f"ckpt-{k}.safetensors", {"w": np.full(3, k, np.float32), "global_step": np.array(k)})
    code = ("import sys, json\n"
            "from ema_cli.cli import main\n"
            "try:\n"
            "    main(sys.argv[1:])\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "import ema_cli.formats.tf_fmt\n"  # the TF format module itself is light
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), "-o", str(tmp_path / "avg.safetensors"),
                           "--decay", "0.9", "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []
    assert (tmp_path / "avg.safetensors").exists()


# --------------------------------------------------------------------------- discovery, steps, names


def test_each_checkpoint_once_whatever_names_it(tf1_run):
    from ema_cli.formats import resolve_inputs

    d = tf1_run["dir"]
    want = [str(d / f"model.ckpt-{s}") for s in range(TF1_STEPS + 1)]
    by_dir = [s.path for s in resolve_inputs([str(d)])]
    assert sorted(by_dir) == sorted(want)
    by_files = [s.path for s in resolve_inputs(sorted(glob.glob(str(d / "model.ckpt-*"))))]
    assert sorted(by_files) == sorted(want)
    assert [s.path for s in resolve_inputs([want[3] + ".meta", want[3], want[3] + ".index",
                                            want[3] + ".data-00000-of-00001"])] == [want[3]]
    # the state file lists only the newest: a directory is not read through it
    assert [s.path for s in resolve_inputs([str(d / "checkpoint")])] == [want[-1]]
    src = resolve_inputs([want[-1]])[0]
    assert src.format == "tf" and set(src.files) == {want[-1] + ".index", want[-1] + ".data-00000-of-00001",
                                                     want[-1] + ".meta"}


def test_step_from_tensor_tf2_names_or_prefix(tf, tf2_run, tmp_path):
    from ema_cli import engine
    from ema_cli.formats import resolve_inputs, tf_fmt

    plan = engine.make_plan([str(tf2_run["dir"])], engine.Options())
    assert [(c.step, c.step_from) for c in plan.checkpoints] == [(s, "tensor") for s in tf2_run["steps"]]

    # no step variable: the number in the prefix (ckpt-N)
    v = tf.Variable(np.ones(2, np.float32))
    ckpt = tf.train.Checkpoint(v=v)
    for _ in range(2):
        ckpt.save(str(tmp_path / "plain" / "ckpt"))
    plan = engine.make_plan([str(tmp_path / "plain")], engine.Options())
    assert [(c.step, c.step_from) for c in plan.checkpoints] == [(1, "name"), (2, "name")]

    # Keras-2 style optimizer iteration counter
    opt = tf.Module()
    opt.iter = tf.Variable(77, dtype=tf.int64)
    p = tf.train.Checkpoint(v=v, optimizer=opt).write(str(tmp_path / "opt" / "x"))
    with tf_fmt.Reader(resolve_inputs([p])[0]) as r:
        assert r.step() == 77
        assert not r.averaged_by_default(r.tensors()["optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE"])


@pytest.mark.parametrize("name, averaged", [
    ("dense/kernel", True),
    ("model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE", True),
    ("bn/moving_mean", True),
    ("dense/kernel/Adam", False), ("dense/kernel/Adam_1", False), ("w/Momentum", False),
    ("w/RMSProp", False), ("w/RMSProp_1", False), ("w/Adagrad", False), ("w/Ftrl_1", False),
    ("training/Adam/dense/kernel/m", False),
    ("beta1_power", False), ("beta2_power", False), ("scope/beta1_power_1", False),
    ("optimizer/_variables/3/.ATTRIBUTES/VARIABLE_VALUE", False),
    ("optimizer/learning_rate/.ATTRIBUTES/VARIABLE_VALUE", False),
    ("model/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE", False),
    ("dense/kernel/ExponentialMovingAverage", False), ("dense/kernel/SWAMovingAverage", False),
    ("model/kernel/ExponentialMovingAverage/.ATTRIBUTES/VARIABLE_VALUE", False),
    ("global_step", False), ("scope/global_step", False),
    ("save_counter/.ATTRIBUTES/VARIABLE_VALUE", False),
])
def test_name_rules_without_meta(name, averaged):
    from ema_cli.formats.tf_fmt import is_model_variable

    assert is_model_variable(name) is averaged


def test_tf_output_staging(tf, tmp_path, capsys):
    """Existing output needs --force (which also drops the old output's extra data
    files); a directory as output is refused; a state file that names other live
    checkpoints (a training directory) is left alone with a warning."""
    from ema_cli import engine
    from ema_cli.errors import EmaError

    for k in (1, 2):
        save_st(tmp_path / f"s-{k}.safetensors", {"a": np.full(3, k, np.float32), "b": np.full(2, k, np.float64)})
    inputs = [str(tmp_path / "s-1.safetensors"), str(tmp_path / "s-2.safetensors")]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    prefix = str(out_dir / "avg.ckpt")

    def run(force=False, output=prefix, env=None):
        plan = engine.make_plan(inputs, engine.Options(), out_format="tf")
        old = os.environ.get("EMA_AVG_TF_BATCH_BYTES")
        os.environ["EMA_AVG_TF_BATCH_BYTES"] = env or str(256 << 20)
        try:
            return engine.run(plan, output, "tf", force=force)
        finally:
            os.environ.pop("EMA_AVG_TF_BATCH_BYTES") if old is None else os.environ.update(EMA_AVG_TF_BATCH_BYTES=old)

    run(env="1")  # two data files
    assert listing(out_dir) == ["avg.ckpt.data-00000-of-00002", "avg.ckpt.data-00001-of-00002", "avg.ckpt.index",
                                "checkpoint"]
    with pytest.raises(EmaError, match="output exists"):
        run()
    res = run(force=True)  # one data file now: the old two are gone
    assert listing(out_dir) == ["avg.ckpt.data-00000-of-00001", "avg.ckpt.index", "checkpoint"]
    assert sorted(res.files) == sorted(str(out_dir / f) for f in listing(out_dir))
    assert bits(values(tf, prefix)["a"]) == bits(np.full(3, 1.5, np.float32))
    # an existing directory is a directory output: this one holds files ema-avg did not write
    with pytest.raises(EmaError, match="did not write"):
        run(output=str(out_dir))

    # a training directory: its state file keeps naming the training checkpoint
    train = tmp_path / "train"
    tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(train / "ckpt"))
    state = (train / "checkpoint").read_text()
    capsys.readouterr()
    run(output=str(train / "avg.ckpt"))
    assert (train / "checkpoint").read_text() == state
    assert "left as it is" in capsys.readouterr().err
    assert tf.train.latest_checkpoint(str(train)) == str(train / "ckpt-1")
    assert [f for f in os.listdir(train) if f.startswith(".")] == []


def test_meta_is_copied_only_when_dtypes_are_kept(tf, tf1_run, tmp_path, capsys):
    """--dtype float16 changes the variables' dtypes: the .meta graph (float32
    variables) would not restore the output, so it is left out, with a warning."""
    from ema_cli import engine

    run = copy_run(tf1_run, tmp_path / "run", keep=[TF1_STEPS - 1, TF1_STEPS])
    for dtype, has_meta in (("keep", True), ("float16", False)):
        prefix = tmp_path / f"out-{dtype}.ckpt"
        plan = engine.make_plan([str(run)], engine.Options(dtype=dtype), out_format="tf")
        capsys.readouterr()
        res = engine.run(plan, str(prefix), "tf")
        assert (str(prefix) + ".meta" in res.files) is has_meta
        assert os.path.exists(str(prefix) + ".meta") is has_meta
        assert ("not copied to the output" in capsys.readouterr().err) is not has_meta
        assert dtypes_of(tf, prefix)["dense/kernel"] == ("float32" if has_meta else "float16")
        assert dtypes_of(tf, prefix)["dense/kernel/Adam"] == "float32"
