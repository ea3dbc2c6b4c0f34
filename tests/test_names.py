"""Shadow names (issue 5): ``restore-map``, ``rename``, ``average --names
shadow`` and ``inspect``, against the real TensorFlow.

The TF1 runs come from ``fixtures/gen_tf.py`` (``train_tf1``): a graph-mode
run with TensorFlow's online ExponentialMovingAverage, Adam slots, a
non-trainable float ``bn/moving_mean``, a partitioned ``part`` and a Saver
checkpoint (with ``.meta``) after every step; ``train_tf1`` also dumps
``ema.variables_to_restore()`` as names from the same graph.  One run uses the
default EMA name, one ``name="MyEMA"`` with the EMA also applied to
``bn/moving_mean`` (so it is in the ``moving_average_variables`` collection).
End-to-end cases run the real CLI in a subprocess (TensorFlow's import costs
~3 s each, so there are few); pure name logic is checked in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURES, assert_clean_error, load_st, run_cli, save_st

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen_tf = _load("gen_tf")
gen_hdf5 = _load("gen_hdf5")

STEPS = 10  # num_updates: decay min(0.5, (1+n)/(10+n)) switches regime at n = 8
EMA = "ExponentialMovingAverage"
CUSTOM = "MyEMA"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tf():
    import tensorflow  # noqa: F401  (a test extra: missing it must fail, not skip)
    from ema_cli.formats.tf_fmt import import_tf

    return import_tf()


@pytest.fixture(scope="module")
def run_default(tf, tmp_path_factory):
    return gen_tf.train_tf1(tmp_path_factory.mktemp("names") / "run", steps=STEPS)


@pytest.fixture(scope="module")
def run_custom(tf, tmp_path_factory):
    return gen_tf.train_tf1(tmp_path_factory.mktemp("names") / "custom", steps=3, seed=3, ema_name=CUSTOM,
                            ema_non_trainable=True)


def values(tf, prefix) -> dict[str, np.ndarray]:
    r = tf.train.load_checkpoint(str(prefix))
    return {k: r.get_tensor(k) for k in r.get_variable_to_shape_map()}


def dtypes_of(tf, prefix) -> dict[str, str]:
    r = tf.train.load_checkpoint(str(prefix))
    return {k: v.name for k, v in r.get_variable_to_dtype_map().items()}


def bits(a) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def tf_map_as_checkpoint_keys(run: dict) -> dict[str, str]:
    """TensorFlow's ``variables_to_restore()`` with each partition slice named by
    its checkpoint key: TF lists ``part/part_0/<EMA> -> part/part_0`` per slice,
    the checkpoint holds ``part`` and ``part/<EMA>`` whole (and TF's own Saver
    cannot restore that per-slice map: it looks for ``part/part_0/<EMA>``)."""
    out: dict[str, str] = {}
    for key, var in run["variables_to_restore"].items():
        full = run["slices"].get(var)
        if full is not None:
            assert key.startswith(var + "/") or key == var, (key, var)
            key, var = full + key[len(var):], full
        assert out.setdefault(key, var) == var, key
    return out


def model_graph(tf, v1, *, partitioned: bool):
    """A fresh TF1 graph with the run's model variables (no optimizer, no EMA)."""
    gs = v1.train.get_or_create_global_step()
    v1.get_variable("dense/kernel", shape=(4, 3))
    v1.get_variable("dense/bias", shape=(3,))
    if partitioned:
        v1.get_variable("part", shape=[6, 2], partitioner=v1.fixed_size_partitioner(2))
    else:
        v1.get_variable("part", shape=[6, 2])
    v1.get_variable("bn/moving_mean", shape=(3,), trainable=False)
    return gs


def read_model(tf, v1, sess) -> dict[str, np.ndarray]:
    """The model variables' values, partitioned ones joined, by checkpoint key."""
    got: dict[str, list] = {}
    for v in v1.global_variables():
        info = v._save_slice_info
        got.setdefault(info.full_name if info else v.op.name, []).append(sess.run(v))
    return {k: np.concatenate(p) if len(p) > 1 else p[0] for k, p in got.items()}


# --------------------------------------------------------------------------- the name rule


def test_suffix_rule_and_tf2_keys():
    from ema_cli import maps, names
    from ema_cli.errors import UsageError

    assert names.shadow_name("dense/kernel") == "dense/kernel/ExponentialMovingAverage"
    assert names.shadow_name("w", "SWAMovingAverage") == "w/SWAMovingAverage"
    k = "model/w/.ATTRIBUTES/VARIABLE_VALUE"
    s = names.shadow_name(k)
    assert s == "model/w/ExponentialMovingAverage/.ATTRIBUTES/VARIABLE_VALUE"
    assert names.is_shadow(s) and not names.is_shadow(k) and names.original_name(s) == k
    assert names.original_name("a/b/MyEMA", "MyEMA") == "a/b"
    assert not names.is_shadow("ExponentialMovingAverage") and not names.is_shadow("/ExponentialMovingAverage")
    assert not names.is_shadow("w/ExponentialMovingAverage", "MyEMA")
    with pytest.raises(ValueError):
        names.original_name("w")
    for bad in ("", "a/b", " EMA", "."):
        with pytest.raises(UsageError):
            names.check_suffix(bad)
    assert names.other_suffixes(["a/SWAMovingAverage", "b/SWAMovingAverage", "c"], EMA) == ["SWAMovingAverage"]


# --------------------------------------------------------------------------- restore-map


def test_restore_map_equals_tensorflow_variables_to_restore(tf, run_default, tmp_path):
    """Default EMA name, newest checkpoint of the run (with its .meta): the map
    equals ``ema.variables_to_restore()`` dumped by TensorFlow in the same run
    (Adam slots, beta powers, global_step and the non-trainable moving_mean
    under their own names; the online shadows not listed under theirs).  A
    Saver built from it restores the shadows into a fresh graph's model
    variables, the partitioned one included."""
    prefix = run_default["prefixes"][-1]
    res = run_cli("restore-map", prefix)  # to stdout
    assert res.code == 0 and res.err == "", res
    got = json.loads(res.out)
    want = tf_map_as_checkpoint_keys(run_default)
    assert got == want
    assert got["bn/moving_mean"] == "bn/moving_mean" and got["dense/kernel/Adam"] == "dense/kernel/Adam"
    assert got[f"part/{EMA}"] == "part" and "part/part_0" not in json.dumps(got)

    v1 = tf.compat.v1
    newest = values(tf, prefix)
    with tf.Graph().as_default():
        model_graph(tf, v1, partitioned=True)
        by_key: dict[str, list] = {}
        for v in v1.global_variables():
            info = v._save_slice_info
            by_key.setdefault(info.full_name if info else v.op.name, []).append(v)
        var_list = {k: (by_key[v] if len(by_key[v]) > 1 else by_key[v][0]) for k, v in got.items() if v in by_key}
        saver = v1.train.Saver(var_list)
        with v1.Session() as sess:
            saver.restore(sess, prefix)
            restored = read_model(tf, v1, sess)
    for name in run_default["averaged"]:
        assert bits(restored[name]) == bits(newest[f"{name}/{EMA}"]), name
    assert bits(restored["bn/moving_mean"]) == bits(newest["bn/moving_mean"])
    assert int(restored["global_step"]) == STEPS


def test_restore_map_custom_ema_name_and_moving_average_collection(tf, run_custom, tmp_path):
    """``ExponentialMovingAverage(name="MyEMA")`` also applied to the
    non-trainable moving_mean (in the moving_average_variables collection):
    ``--suffix MyEMA`` gives TensorFlow's map; ``-o`` writes it atomically
    (existing output needs --force) and ``--json`` describes it."""
    prefix = run_custom["prefixes"][-1]
    out = tmp_path / "map.json"
    res = run_cli("restore-map", prefix, "--suffix", CUSTOM, "-o", out, "--json")
    assert res.code == 0, res
    got = json.loads(out.read_text())
    assert got == tf_map_as_checkpoint_keys(run_custom)
    assert got[f"bn/moving_mean/{CUSTOM}"] == "bn/moving_mean"
    doc = res.json()
    assert doc["averaged_from"] == "meta collections" and doc["suffix"] == CUSTOM
    assert doc["entries"] == len(got) and doc["from_shadow"] == 4
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []
    res = run_cli("restore-map", prefix, "--suffix", CUSTOM, "-o", out)
    assert_clean_error(res, str(out), "exists", code=1)


def test_restore_map_averaged_set_in_process(tf, run_default, run_custom, tmp_path):
    """The averaged set: .meta collections when present, else the name rules
    (which count the moving_mean as a model weight: TF's map needs the .meta);
    --include/--exclude change it as they change averaging; the TF2 object
    graph is not a variable."""
    from ema_cli import engine, maps, names

    pool = engine.ReaderPool()
    try:
        _, r = maps.open_one(run_custom["prefixes"][-1], pool, "restore-map")
        assert maps.averaged_from(r) == "meta collections"
        # the default name on the MyEMA run: MyEMA shadows are ordinary tensors under their own names
        m = maps.restore_map(r, EMA)
        assert m[f"dense/kernel/{EMA}"] == "dense/kernel" and m[f"dense/kernel/{CUSTOM}"] == f"dense/kernel/{CUSTOM}"
        m = maps.restore_map(r, CUSTOM, exclude=["^dense/bias$"])
        # not averaged: restored from its own name, and its online shadow is just another tensor
        assert m["dense/bias"] == "dense/bias" and m[f"dense/bias/{CUSTOM}"] == f"dense/bias/{CUSTOM}"
        assert m[f"dense/kernel/{CUSTOM}"] == "dense/kernel"

        bare = tmp_path / "bare"
        bare.mkdir()
        prefix = run_default["prefixes"][-1]
        for f in Path(prefix).parent.glob(Path(prefix).name + ".*"):
            if f.suffix != ".meta":
                shutil.copy(f, bare)
        _, r = maps.open_one(str(bare / Path(prefix).name), pool, "restore-map")
        assert maps.averaged_from(r) == "name rules"
        m = maps.restore_map(r)
        assert m[f"bn/moving_mean/{EMA}"] == "bn/moving_mean"  # differs from TF: no .meta to say it is not trained
        assert m["dense/kernel/Adam"] == "dense/kernel/Adam" and m["global_step"] == "global_step"

        run2 = gen_tf.train_tf2(tmp_path / "tf2", saves=1)
        _, r = maps.open_one(run2["prefixes"][-1], pool, "restore-map")
        m = maps.restore_map(r)
        assert m["w/ExponentialMovingAverage/.ATTRIBUTES/VARIABLE_VALUE"] == "w/.ATTRIBUTES/VARIABLE_VALUE"
        assert m["step/.ATTRIBUTES/VARIABLE_VALUE"] == "step/.ATTRIBUTES/VARIABLE_VALUE"
        assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in m.values()
    finally:
        pool.close()


def test_restore_map_safetensors_and_hdf5(tmp_path):
    """Other formats, with their own averaged sets: safetensors float tensors,
    HDF5 float datasets outside ``optimizer/``; a sharded checkpoint is one."""
    st = FIXTURES / "safetensors" / "ckpt-12.safetensors"
    tensors, _ = load_st(st)
    res = run_cli("restore-map", st)
    assert res.code == 0, res
    floats = [k for k, v in tensors.items() if v.dtype.kind == "f" or v.dtype == ml_dtypes.bfloat16]
    assert floats and len(floats) < len(tensors)
    want = {f"{k}/{EMA}": k for k in floats} | {k: k for k in tensors if k not in floats}
    assert res.json() == want

    res = run_cli("restore-map", FIXTURES / "sharded", "--suffix", "SWAMovingAverage")
    assert res.code == 0, res
    m = res.json()
    assert m["encoder/embedding/SWAMovingAverage"] == "encoder/embedding" and m["global_step"] == "global_step"

    gen_hdf5.write_plain(tmp_path / "p.h5", 100, seed=1)
    res = run_cli("restore-map", tmp_path / "p.h5", "--exclude", "embedding")
    assert res.code == 0, res
    assert res.json() == {
        f"model/encoder/kernel/{EMA}": "model/encoder/kernel", f"model/encoder/bias/{EMA}": "model/encoder/bias",
        f"model/head/kernel/{EMA}": "model/head/kernel", "model/encoder/embedding": "model/encoder/embedding",
        "model/head/vocab_ids": "model/head/vocab_ids", "optimizer/momentum": "optimizer/momentum", "step": "step",
    }
    assert_clean_error(run_cli("restore-map", FIXTURES / "safetensors"), "12 checkpoints", "ckpt-12", code=2)
    assert_clean_error(run_cli("restore-map", st, "--suffix", "a/b"), "--suffix", code=2)


# --------------------------------------------------------------------------- rename


def test_rename_to_original_is_the_offline_swapping_saver(tf, run_default, tmp_path):
    """The last checkpoint of the online-EMA run, --to-original: each original
    name holds exactly TF's online shadow value, no shadow name remains,
    everything else (slots, step, moving_mean) and every dtype is kept; no
    .meta (its graph names the shadows); TensorFlow's default Saver restores it
    into a fresh graph (partitioned variable included)."""
    prefix = run_default["prefixes"][-1]
    out = tmp_path / "out" / "eval.ckpt"
    out.parent.mkdir()
    res = run_cli("rename", prefix, "-o", out, "--to-original", "--json")
    assert res.code == 0 and res.err == "", res
    doc = res.json()
    assert doc["renamed"] == 3 and doc["dropped"] == 3 and doc["format"] == "tf"
    assert doc["names"] == {f"{n}/{EMA}": n for n in sorted(run_default["averaged"])}

    src, got = values(tf, prefix), values(tf, out)
    assert not [k for k in got if k.endswith("/" + EMA)]
    assert set(got) == {k for k in src if not k.endswith("/" + EMA)}
    for name in run_default["averaged"]:
        assert bits(got[name]) == bits(src[f"{name}/{EMA}"]), name
        assert bits(got[name]) != bits(src[name]), name
    for name in set(got) - set(run_default["averaged"]):
        assert bits(got[name]) == bits(src[name]), name
    d_in = dtypes_of(tf, prefix)
    assert dtypes_of(tf, out) == {k: d_in[k] for k in got}
    assert sorted(os.listdir(out.parent)) == ["checkpoint", "eval.ckpt.data-00000-of-00001", "eval.ckpt.index"]

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        model_graph(tf, v1, partitioned=True)
        saver = v1.train.Saver()
        with v1.Session() as sess:
            saver.restore(sess, tf.train.latest_checkpoint(str(out.parent)))
            restored = read_model(tf, v1, sess)
    for name in run_default["averaged"]:
        assert bits(restored[name]) == bits(src[f"{name}/{EMA}"]), name

    # the custom-name run: --suffix picks its shadows (moving_mean's too)
    res = run_cli("rename", prefix, "-o", tmp_path / "x.ckpt", "--to-original", "--suffix", CUSTOM)
    assert_clean_error(res, "nothing to rename", f"*/{CUSTOM}", f"--suffix {EMA}", code=1)
    assert not list(tmp_path.glob("x.ckpt*"))


def test_rename_custom_suffix_in_process(tf, run_custom, tmp_path):
    from ema_cli import engine, maps, names

    prefix = run_custom["prefixes"][-1]
    plan = maps.rename_plan(prefix, names.TO_ORIGINAL, CUSTOM)
    assert plan.use_template is False and plan.describe() is None
    assert {t.name: t.out_name for t in plan.tasks if t.name != t.out_name} == {
        f"{n}/{CUSTOM}": n for n in run_custom["averaged"]}
    out = tmp_path / "o.ckpt"
    engine.run(plan, str(out), "tf")
    src, got = values(tf, prefix), values(tf, out)
    assert bits(got["bn/moving_mean"]) == bits(src[f"bn/moving_mean/{CUSTOM}"])
    assert not (tmp_path / "o.ckpt.meta").exists()

    # TF2 keys: the shadow keeps the /.ATTRIBUTES tail
    run2 = gen_tf.train_tf2(tmp_path / "tf2", saves=1)
    pool = engine.ReaderPool()
    try:
        _, r = maps.open_one(run2["prefixes"][0], pool, "rename")
        m = maps.rename_map(r, names.TO_SHADOW)
    finally:
        pool.close()
    assert m["w/.ATTRIBUTES/VARIABLE_VALUE"] == "w/ExponentialMovingAverage/.ATTRIBUTES/VARIABLE_VALUE"
    assert m["_CHECKPOINTABLE_OBJECT_GRAPH"] == "_CHECKPOINTABLE_OBJECT_GRAPH"
    assert m["step/.ATTRIBUTES/VARIABLE_VALUE"] == "step/.ATTRIBUTES/VARIABLE_VALUE"


def test_rename_round_trip_safetensors_exactly(tmp_path):
    """--to-shadow then --to-original gives back the safetensors file byte for
    byte (names, order, dtypes incl. bf16/f16, values, __metadata__: a rename
    records no recipe).  The shadow checkpoint holds the averaged set under
    x/SUFFIX and the integer tensors under their names."""
    src = FIXTURES / "safetensors" / "ckpt-12.safetensors"
    mid, back = tmp_path / "shadow.safetensors", tmp_path / "back.safetensors"
    res = run_cli("rename", src, "-o", mid, "--to-shadow", "--suffix", "SWAMovingAverage", "--json")
    assert res.code == 0, res
    t_src, meta_src = load_st(src)
    t_mid, meta_mid = load_st(mid)
    assert meta_mid == meta_src
    for k, v in t_src.items():
        name = k if v.dtype.kind in "iub" else f"{k}/SWAMovingAverage"
        assert t_mid[name].dtype == v.dtype and bits(t_mid[name]) == bits(v), k
    assert len(t_mid) == len(t_src) and res.json()["renamed"] == sum(v.dtype.kind not in "iub" for v in t_src.values())

    res = run_cli("rename", mid, "-o", back, "--to-original", "--suffix", "SWAMovingAverage")
    assert res.code == 0 and res.err == "", res
    assert back.read_bytes() == src.read_bytes()

    # a sharded checkpoint is one input; the output is one file unless --max-shard-size
    sh = tmp_path / "sh.safetensors"
    assert run_cli("rename", FIXTURES / "sharded", "-o", sh, "--to-shadow").code == 0
    res = run_cli("rename", sh, "-o", tmp_path / "sh_back", "--to-original", "--max-shard-size", "600B")
    assert res.code == 0, res
    whole = {}
    for f in sorted((FIXTURES / "sharded" / "checkpoint-1200").glob("*.safetensors")):
        whole.update(load_st(f)[0])
    back_t = {}
    files = sorted((tmp_path / "sh_back").glob("*.safetensors"))
    assert len(files) == 2 and (tmp_path / "sh_back" / "model.safetensors.index.json").exists()
    for f in files:
        back_t.update(load_st(f)[0])
    assert back_t.keys() == whole.keys()
    assert all(back_t[k].dtype == whole[k].dtype and bits(back_t[k]) == bits(whole[k]) for k in whole)


def test_rename_round_trip_hdf5(tmp_path):
    """HDF5 keeps format, dtypes (bf16 as Keras' tagged opaque) and values; the
    renamed file is written fresh (its groups are the new names)."""
    from ema_cli import engine, maps, names

    src = tmp_path / "p.h5"
    t = gen_hdf5.write_plain(src, 100, seed=2)
    engine.run(maps.rename_plan(str(src), names.TO_SHADOW), str(tmp_path / "s.h5"), "hdf5")
    with h5py.File(tmp_path / "s.h5") as f:
        assert f[f"model/encoder/embedding/{EMA}"].attrs["dtype"] == "bfloat16"
        assert "optimizer/momentum" in f and f"optimizer/momentum/{EMA}" not in f
    engine.run(maps.rename_plan(str(tmp_path / "s.h5"), names.TO_ORIGINAL), str(tmp_path / "o.h5"), "hdf5")
    pool = engine.ReaderPool()
    try:
        _, r = maps.open_one(str(tmp_path / "o.h5"), pool, "test")
        assert set(r.tensors()) == set(t)
        for k, v in t.items():
            got = r.read(k)
            assert got.dtype == v.dtype and got.shape == v.shape and bits(got) == bits(v), k
        assert r.step() == 100
    finally:
        pool.close()


def test_rename_errors_say_why(tmp_path):
    st = FIXTURES / "safetensors" / "ckpt-3.safetensors"
    out = tmp_path / "o.safetensors"
    assert_clean_error(run_cli("rename", st, "-o", out, "--to-original"),
                       "nothing to rename", f"*/{EMA}", "no moving averages", code=1)
    swa = save_st(tmp_path / "swa.safetensors", {"w": np.ones(2, np.float32), "w/SWAMovingAverage": np.ones(2, np.float32)})
    assert_clean_error(run_cli("rename", swa, "-o", out, "--to-original"), "--suffix SWAMovingAverage", code=1)
    assert_clean_error(run_cli("rename", swa, "-o", out, "--to-shadow", "--suffix", "SWAMovingAverage"),
                       "already holds 1 shadow", code=1)
    ints = save_st(tmp_path / "ints.safetensors", {"ids": np.arange(3, dtype=np.int32)})
    assert_clean_error(run_cli("rename", ints, "-o", out, "--to-shadow"), "nothing to rename", "averaged set", code=1)
    bad = save_st(tmp_path / "bad.safetensors", {"w": np.ones(2, np.float32), f"w/{EMA}": np.ones(3, np.float32)})
    assert_clean_error(run_cli("rename", bad, "-o", out, "--to-original"), "tensor 'w'", "shadow", code=1)
    assert_clean_error(run_cli("rename", st, "-o", out), "exactly one of", code=2)
    assert_clean_error(run_cli("rename", st, "-o", out, "--to-shadow", "--to-original"), "exactly one of", code=2)
    assert_clean_error(run_cli("rename", st, "-o", tmp_path / "o.h5", "--to-shadow"), "keeps the input's format",
                       code=2)
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".o*"))
    assert run_cli("rename", st, "-o", out, "--to-shadow").code == 0
    assert_clean_error(run_cli("rename", st, "-o", out, "--to-shadow"), "exists", "--force", code=1)
    assert run_cli("rename", st, "-o", out, "--to-shadow", "--force", "--quiet").code == 0
    assert_clean_error(run_cli("rename", st, "-o", st, "--to-shadow", "--force"), "one of the inputs", code=1)


# --------------------------------------------------------------------------- average --names shadow


def test_names_shadow_tasks_replace_input_shadows(tf, run_default):
    """Averaging a run that holds shadows with --names shadow: each name once,
    the shadow names hold the new averages, the raw variables are copies."""
    from ema_cli import engine

    plan = engine.make_plan([str(run_default["dir"])], engine.Options(names="shadow"))
    outs = [t.out_name for t in plan.tasks]
    assert len(outs) == len(set(outs)) == 16
    by_out = {t.out_name: t for t in plan.tasks}
    for n in run_default["averaged"]:
        assert (by_out[f"{n}/{EMA}"].name, by_out[f"{n}/{EMA}"].action) == (n, "average")
        assert (by_out[n].name, by_out[n].action) == (n, "copy")
        assert outs.index(f"{n}/{EMA}") == outs.index(n) + 1
    assert {t.action for n, t in by_out.items() if n not in run_default["averaged"] and not n.endswith(EMA)} == {"copy"}
    # --include on a shadow: still each name once, the variable's new average wins x/SUFFIX
    plan = engine.make_plan([str(run_default["dir"])], engine.Options(names="shadow", include=[f"^dense/bias/{EMA}$"]))
    outs = [t.out_name for t in plan.tasks]
    assert len(outs) == len(set(outs))
    by_out = {t.out_name: t for t in plan.tasks}
    assert by_out[f"dense/bias/{EMA}"].name == "dense/bias"


@pytest.mark.parametrize("exact", [False, True], ids=["float64", "tf-exact"])
def test_eval_pattern_restores_offline_ema_with_variables_to_restore(tf, run_default, tmp_path, exact):
    """The seeds' evaluation pattern: average the run with --format tf --names
    shadow --decay D --num-updates; a fresh TF1 graph with the same variables
    restores it with Saver(ExponentialMovingAverage(D).variables_to_restore());
    the model variables then hold the offline EMA, which equals TensorFlow's
    online shadows (to 1e-6; bit for bit with --tf-exact).  ``part`` is a plain
    variable in that graph: TF's per-slice map cannot restore a partitioned one
    from any checkpoint (test_restore_map_equals_... restores it through
    restore-map instead)."""
    decay = run_default["decay"]
    out = tmp_path / "avg.ckpt"
    res = run_cli(run_default["dir"], "-o", out, "--format", "tf", "--names", "shadow", "--decay", decay,
                  "--num-updates", *(["--tf-exact"] if exact else []), "--json")
    assert res.code == 0 and res.err == "", res
    assert res.json()["tensors"]["averaged"] == 3
    newest = values(tf, run_default["prefixes"][-1])
    got = values(tf, out)
    assert set(got) == set(newest)  # each name once: the input's shadows were replaced, not duplicated
    assert dtypes_of(tf, out) == dtypes_of(tf, run_default["prefixes"][-1])
    for name in set(got) - {f"{n}/{EMA}" for n in run_default["averaged"]}:
        assert bits(got[name]) == bits(newest[name]), name  # raw values of the averaged tensors too
    assert (tmp_path / "avg.ckpt.meta").exists()  # the names are the training graph's: its .meta still fits

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        model_graph(tf, v1, partitioned=False)
        saver = v1.train.Saver(v1.train.ExponentialMovingAverage(decay).variables_to_restore())
        with v1.Session() as sess:
            saver.restore(sess, str(out))
            restored = read_model(tf, v1, sess)
    for name in run_default["averaged"]:
        online = newest[f"{name}/{EMA}"]
        assert bits(restored[name]) == bits(got[f"{name}/{EMA}"]), name
        if exact:
            assert bits(restored[name]) == bits(online), name
        else:
            assert rel_err(restored[name], online) <= 1e-6, name
        assert rel_err(restored[name], newest[name]) > 1e-3, name  # an average, not the raw weights
    assert bits(restored["bn/moving_mean"]) == bits(newest["bn/moving_mean"])
    assert int(restored["global_step"]) == STEPS


# --------------------------------------------------------------------------- inspect


@pytest.fixture(scope="module")
def hdf5_fixtures(tmp_path_factory):
    pytest.importorskip("keras")
    d = tmp_path_factory.mktemp("h5fx")
    gen_hdf5.make(d)
    return d


def _truth_tf(tf, prefix) -> dict[str, tuple[str, list[int]]]:
    r = tf.train.load_checkpoint(str(prefix))
    shapes, dts = r.get_variable_to_shape_map(), r.get_variable_to_dtype_map()
    return {k: ({"half": "float16"}.get(dts[k].name, dts[k].name), list(shapes[k])) for k in shapes}


def _truth_h5(path) -> dict[str, tuple[str, list[int]]]:
    out = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                tag = obj.attrs.get("dtype")
                tag = tag.decode() if isinstance(tag, bytes) else tag
                if obj.dtype.kind == "V":
                    dt = tag or "bfloat16"  # legacy Keras drops the tag (see hdf5_fmt)
                elif obj.dtype.kind in "OSU":
                    dt = "string"
                else:
                    dt = obj.dtype.name
                out[name] = (dt, list(obj.shape))
        f.visititems(visit)
    return out


def _truth_st(paths) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for p in paths:
        raw = Path(p).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                 "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2", "I16": "int16"}
        for k, v in header.items():
            if k != "__metadata__":
                out[k] = (names[v["dtype"]], v["shape"])
    return out


def test_inspect_every_fixture_format(tf, run_default, hdf5_fixtures, tmp_path):
    """One `inspect --json` over a checkpoint of every fixture format (safetensors,
    sharded safetensors, TF1 with online EMA and .meta, TF2 object-based,
    Keras 3 .weights.h5, legacy Keras .h5, plain HDF5): every tensor listed
    with the dtype and shape the format's own library reports; roles and
    totals; the TF1 roles come from the .meta (moving_mean copied, shadows
    marked with what they shadow)."""
    run2 = gen_tf.train_tf2(tmp_path / "tf2", saves=1)
    st = FIXTURES / "safetensors" / "ckpt-12.safetensors"
    shard_dir = FIXTURES / "sharded" / "checkpoint-1200"
    cases = [
        (st, _truth_st([st])),
        (shard_dir, _truth_st(sorted(shard_dir.glob("*.safetensors")))),
        (run_default["prefixes"][-1], _truth_tf(tf, run_default["prefixes"][-1])),
        (run2["prefixes"][0], _truth_tf(tf, run2["prefixes"][0])),
        (hdf5_fixtures / "keras" / "epoch-4.weights.h5", _truth_h5(hdf5_fixtures / "keras" / "epoch-4.weights.h5")),
        (hdf5_fixtures / "keras_legacy" / "model-4.h5", _truth_h5(hdf5_fixtures / "keras_legacy" / "model-4.h5")),
        (hdf5_fixtures / "h5" / "ckpt-3.h5", _truth_h5(hdf5_fixtures / "h5" / "ckpt-3.h5")),
    ]
    res = run_cli("inspect", *[c[0] for c in cases], "--json", "--quiet")
    assert res.code == 0 and res.err == "", res
    docs = res.json()
    assert [d["format"] for d in docs] == ["safetensors", "safetensors", "tf", "tf", "hdf5", "hdf5", "hdf5"]
    for doc, (path, truth) in zip(docs, cases):
        listed = {t["name"]: (t["dtype"], t["shape"]) for t in doc["tensors"]}
        if doc["format"] == "hdf5":  # HDF5 strings and non-tensor datasets aside, every dataset is listed
            truth = {k: v for k, v in truth.items() if k in listed or v[0] != "string"}
        assert listed == truth, path
        assert doc["totals"]["tensors"] == len(truth)
        assert doc["totals"]["bytes"] == sum(t["nbytes"] for t in doc["tensors"])
        assert sum(doc["totals"]["roles"].values()) == len(truth)

    tf1 = {t["name"]: t for t in docs[2]["tensors"]}
    assert docs[2]["averaged_from"] == "meta collections" and docs[2]["step"] == STEPS
    assert {n for n, t in tf1.items() if t["role"] == "averaged"} == set(run_default["averaged"])
    assert {n: t.get("shadow_of") for n, t in tf1.items() if t["role"] == "shadow"} == {
        f"{n}/{EMA}": n for n in run_default["averaged"]}
    assert tf1["bn/moving_mean"]["role"] == "copied" and tf1["dense/kernel/Adam"]["role"] == "copied"
    assert docs[0]["step"] == 1200 and docs[1]["step"] == 1200
    roles = {t["name"]: t["role"] for t in docs[6]["tensors"]}
    assert roles["optimizer/momentum"] == "copied" and roles["model/encoder/embedding"] == "averaged"


def test_inspect_suffix_and_table(tf, run_custom):
    """--suffix decides which tensors are shadows; the table (stdout) lists them."""
    res = run_cli("inspect", run_custom["prefixes"][-1], "--suffix", CUSTOM, "--json")
    assert res.code == 0, res
    doc = res.json()
    roles = {t["name"]: t["role"] for t in doc["tensors"]}
    assert roles["bn/moving_mean"] == "averaged" and roles[f"bn/moving_mean/{CUSTOM}"] == "shadow"
    assert doc["totals"]["roles"] == {"copied": 9, "averaged": 4, "shadow": 4}
    # without --json, the table is the primary output: stdout (with --json, only the JSON is printed)
    assert res.err == ""
    res = run_cli("inspect", run_custom["prefixes"][-1], "--suffix", CUSTOM)
    assert res.code == 0 and res.err == ""
    assert f"bn/moving_mean/{CUSTOM}" in res.out and "shadow: 4" in res.out


def test_names_shadow_then_to_original_equals_names_original(tmp_path):
    """safetensors: --names shadow keeps the newest raw values beside the
    averages; renaming it --to-original gives what --names original writes."""
    ins = FIXTURES / "safetensors"
    sh, orig, back = tmp_path / "sh.safetensors", tmp_path / "orig.safetensors", tmp_path / "back.safetensors"
    assert run_cli(ins, "-o", sh, "--decay", "0.8", "--names", "shadow").code == 0
    assert run_cli(ins, "-o", orig, "--decay", "0.8").code == 0
    t_sh, _ = load_st(sh)
    newest, _ = load_st(ins / "ckpt-12.safetensors")
    assert {k for k in t_sh if not k.endswith("/" + EMA)} == set(newest)
    for k, v in newest.items():
        assert bits(t_sh[k]) == bits(v), k
    res = run_cli("rename", sh, "-o", back, "--to-original", "--json")
    assert res.code == 0 and res.json()["dropped"] == 5, res
    t_back, meta_back = load_st(back)
    t_orig, meta_orig = load_st(orig)
    assert list(t_back) == list(t_orig)
    assert all(t_back[k].dtype == t_orig[k].dtype and bits(t_back[k]) == bits(t_orig[k]) for k in t_orig)
    assert json.loads(meta_back["ema_avg"])["mode"] == "ema"  # the averaging recipe survives the rename


def test_rename_tf2_rewrites_the_object_graph(tf, tmp_path):
    """--to-shadow on a TF2 object-based checkpoint: the object graph follows the
    new keys, so tf.train.Checkpoint restores every variable (no warning)."""
    run2 = gen_tf.train_tf2(tmp_path / "tf2", saves=1)
    out = tmp_path / "o" / "s.ckpt"
    out.parent.mkdir()
    res = run_cli("rename", run2["prefixes"][0], "-o", out, "--to-shadow")
    assert res.code == 0, res
    assert not [ln for ln in res.err.splitlines() if ln.startswith("warning: ")], res
    got, src = values(tf, out), values(tf, run2["prefixes"][0])
    assert "w/ExponentialMovingAverage/.ATTRIBUTES/VARIABLE_VALUE" in got and "_CHECKPOINTABLE_OBJECT_GRAPH" in got
    assert "w/.ATTRIBUTES/VARIABLE_VALUE" not in got
    fresh = gen_tf.make_tf2_module()
    status = tf.train.Checkpoint(root=fresh).restore(str(out))
    status.assert_consumed()
    assert bits(fresh.w.numpy()) == bits(src["w/.ATTRIBUTES/VARIABLE_VALUE"])
    assert bits(fresh.head.kernel.numpy()) == bits(src["head/kernel/.ATTRIBUTES/VARIABLE_VALUE"])
    assert int(fresh.step.numpy()) == int(src["step/.ATTRIBUTES/VARIABLE_VALUE"])
    res = run_cli("rename", run2["prefixes"][0], "-o", out, "--to-shadow", "--force", "--quiet")
    assert res.code == 0 and "warning:" not in res.err, res
