"""TF2 object-based checkpoints: roles from the object graph (issue 10, item 1).

Real Keras 3 and tf.keras 2 (``tf_keras``) models trained with ``fit`` and saved
by ``tf.train.CheckpointManager(max_to_keep=3)`` after each of 5 epochs; the
averages are checked by restoring them with ``tf.train.Checkpoint`` into a
fresh model and optimizer, against the float64 mean of what TensorFlow itself
restores from each kept checkpoint.  One training run per configuration,
shared by the module.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import run_cli  # noqa: E402

EPOCHS = 5
KEEP = 3
CONFIGS = ("keras3", "keras3_lso_bf16", "keras3_model_only", "tf_keras")


@pytest.fixture(scope="module")
def tf():
    import tensorflow  # noqa: F401  (a test extra: missing it must fail, not skip)
    from ema_cli.formats.tf_fmt import import_tf

    return import_tf()


def _keras(config):
    if config == "tf_keras":
        import tf_keras as keras
    else:
        import keras
    return keras


def build(config):
    """A fresh (model, optimizer, checkpoint object) for a configuration."""
    import tensorflow as tf

    keras = _keras(config)
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if config == "keras3_lso_bf16" else "float32")
    try:
        inp = keras.Input((4,))
        x = keras.layers.Dense(8, activation="relu")(inp)
        x = keras.layers.BatchNormalization()(x)
        out = keras.layers.Dense(2, dtype="float32")(x)
        model = keras.Model(inp, out)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    opt = keras.optimizers.Adam(1e-2)
    if config == "keras3_lso_bf16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    model.compile(opt, "mse")
    ckpt = tf.train.Checkpoint(model=model) if config == "keras3_model_only" else \
        tf.train.Checkpoint(model=model, optimizer=opt)
    return model, opt, ckpt


def train(config, out_dir):
    import tensorflow as tf

    keras = _keras(config)
    keras.utils.set_random_seed(1)
    model, opt, ckpt = build(config)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = rng.standard_normal((32, 2)).astype(np.float32)
    manager = tf.train.CheckpointManager(ckpt, str(out_dir), max_to_keep=KEEP)

    class Save(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            manager.save()

    model.fit(x, y, epochs=EPOCHS, batch_size=16, verbose=0, callbacks=[Save()])
    return {"config": config, "dir": out_dir, "kept": list(manager.checkpoints), "model": model, "opt": opt}


@pytest.fixture(scope="module")
def runs(tf, tmp_path_factory):
    cache = {}

    def get(config):
        if config not in cache:
            cache[config] = train(config, tmp_path_factory.mktemp(config) / "ckpts")
        return cache[config]

    return get


@pytest.fixture(scope="module")
def averaged(runs, tmp_path_factory):
    """``ema-avg DIR -o avg.ckpt --json`` of a configuration's run (once): (prefix, JSON)."""
    cache = {}

    def get(config):
        if config not in cache:
            out = tmp_path_factory.mktemp(config + "-avg") / "avg.ckpt"
            res = run_cli(runs(config)["dir"], "-o", out, "--json")
            assert res.code == 0, res
            assert not [ln for ln in res.err.splitlines() if ln.startswith("warning: ")], res
            cache[config] = (out, res.json())
        return cache[config]

    return get


def inspect_doc(prefix, cli: bool):
    """``inspect --json`` of one checkpoint: through the CLI, or in-process (the same document)."""
    if cli:
        res = run_cli("inspect", prefix, "--json")
        assert res.code == 0, res
        return res.json()
    from ema_cli import inspect

    (doc,) = inspect.inspect([str(prefix)], include=[], exclude=[], suffix="ExponentialMovingAverage")
    return doc


def restored(config, prefix, tf):
    """(model, optimizer) restored from ``prefix`` by TensorFlow, every object matched."""
    model, opt, ckpt = build(config)
    opt.build(model.trainable_variables)
    ckpt.restore(str(prefix)).assert_existing_objects_matched()
    return model, opt


def opt_values(opt):
    return [np.asarray(v.numpy()) for v in opt.variables]


def bits(a):
    return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("config", CONFIGS)
def test_average_restores_weights_mean_and_newest_optimizer(tf, runs, averaged, config):
    """The TF-format mean restores into a fresh model + optimizer: every model
    weight (kernels, biases, BatchNorm gamma/beta and statistics) is the float64
    mean of the kept checkpoints, the optimizer (Adam moments, iterations,
    learning rate, loss scale) is the newest's bit for bit; ``inspect --json``
    agrees, and the step comes from the optimizer's iterations."""
    run = runs(config)
    assert len(run["kept"]) == KEEP
    out, doc = averaged(config)
    # 2 optimizer steps per epoch (32 samples, batch 16): the inner optimizer's for the LossScaleOptimizer
    assert [(c["step"], c["step_from"]) for c in doc["checkpoints"]] == [
        (2 * e, "tensor") for e in range(EPOCHS - KEEP + 1, EPOCHS + 1)]

    ins = [restored(config, p, tf) for p in run["kept"]]
    got_model, got_opt = restored(config, out, tf)
    n_weights = 0
    for i, w in enumerate(got_model.weights):
        assert w.dtype == tf.float32, w.name  # mixed_bfloat16 keeps float32 variables
        stack = np.stack([np.asarray(m.weights[i].numpy(), np.float64) for m, _ in ins])
        assert not np.all(stack == stack[-1]), w.name  # training changed it: a copy would fail
        np.testing.assert_allclose(w.numpy(), stack.mean(axis=0), rtol=1e-6, atol=1e-7, err_msg=w.name)
        n_weights += 1
    assert n_weights == 8
    newest_opt = opt_values(ins[-1][1])
    got = opt_values(got_opt)
    assert len(got) == len(newest_opt) >= 1 + 2 * 6  # iterations, Adam's m and v per weight
    for a, b in zip(got, newest_opt):
        assert bits(a) == bits(b)
    assert int(got_opt.iterations.numpy()) == 2 * EPOCHS

    # inspect: no model weight copied, no optimizer state averaged
    idoc = inspect_doc(run["kept"][-1], cli=config == "keras3")
    assert idoc["averaged_from"] == "object graph" and idoc["step"] == 2 * EPOCHS
    rows = idoc["tensors"]
    kinds = {}
    for r in rows:
        kinds.setdefault(r["kind"], []).append(r)
        assert (r["role"] == "averaged") == (r["kind"] in ("parameter", "buffer")), r
        if r["kind"] != "other":
            assert r["why"].startswith("object graph: "), r
    assert len(kinds["parameter"]) == 6 and len(kinds["buffer"]) == 2
    assert all("moving_" in r["why"] for r in kinds["buffer"])
    assert all(r["why"].startswith("object graph: model variable") for r in kinds["parameter"])
    # LossScaleOptimizer: its own counters and the inner optimizer's; tf.keras leaves its learning rate
    # variable out of .variables
    n_opt = len(run["opt"].variables) + (config == "tf_keras")
    assert len(kinds["optimizer"]) == n_opt, [r["name"] for r in kinds["optimizer"]]
    assert [r["name"] for r in kinds["counter"]] == ["save_counter/.ATTRIBUTES/VARIABLE_VALUE"]
    assert [r["name"] for r in kinds["other"]] == ["_CHECKPOINTABLE_OBJECT_GRAPH"]
    if config in ("keras3", "keras3_lso_bf16"):
        # TF reached the weights through the optimizer first: the keys say so, the graph does not
        assert all(r["name"].startswith("optimizer/_trainable_variables/") for r in kinds["parameter"])
    if config == "keras3_model_only":
        # a compiled model carries its optimizer: Adam's moments are under model/optimizer/
        assert all(r["name"].startswith("model/optimizer/") for r in kinds["optimizer"])
        # and the name rules (used when the graph is unreadable) no longer take them for model weights
        from ema_cli.formats.tf_fmt import is_model_variable

        assert not any(is_model_variable(r["name"]) for r in kinds["optimizer"])
        assert all(is_model_variable(r["name"]) for r in kinds["parameter"] + kinds["buffer"])


def test_tf2_rename_round_trip_restores_the_averages(tf, runs, averaged, tmp_path):
    """``average --names shadow`` on a real CheckpointManager run, then ``rename
    --to-original``: tf.train.Checkpoint restores the averages into the model
    (and the newest optimizer).  ``--to-shadow`` rewrites the object graph so
    the renamed keys restore too; renaming back gives the same graph."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2 as pb

    run = runs("keras3")
    mean = averaged("keras3")[0]
    shadow = tmp_path / "shadow" / "s.ckpt"
    orig = tmp_path / "orig" / "o.ckpt"
    back = tmp_path / "back" / "b.ckpt"
    for p in (shadow, orig, back):
        p.parent.mkdir()
    res = run_cli(run["dir"], "-o", shadow, "--names", "shadow")
    assert res.code == 0, res
    r = tf.train.load_checkpoint(str(shadow))
    shadows = [k for k in r.get_variable_to_shape_map() if "/ExponentialMovingAverage/" in k]
    assert len(shadows) == 8

    res = run_cli("rename", shadow, "-o", orig, "--to-original", "--json")
    assert res.code == 0, res
    assert not [ln for ln in res.err.splitlines() if ln.startswith("warning: ")], res
    assert res.json()["renamed"] == 8 and res.json()["rewritten"] == ["_CHECKPOINTABLE_OBJECT_GRAPH"]
    want_model, want_opt = restored("keras3", mean, tf)
    got_model, got_opt = restored("keras3", orig, tf)
    newest_model, _ = restored("keras3", run["kept"][-1], tf)
    for w, g, n in zip(want_model.weights, got_model.weights, newest_model.weights):
        assert bits(g.numpy()) == bits(w.numpy()), g.name
        assert bits(g.numpy()) != bits(n.numpy()), g.name
    for a, b in zip(opt_values(got_opt), opt_values(want_opt)):
        assert bits(a) == bits(b)

    # --to-shadow on the average (in-process, as the CLI runs it): the graph names the */ExponentialMovingAverage keys
    from ema_cli import maps, names

    maps.run_rename(maps.rename_plan(str(mean), names.TO_SHADOW), str(shadow), "tf", force=True)
    r = tf.train.load_checkpoint(str(shadow))
    keys = set(r.get_variable_to_shape_map())
    graph = pb.TrackableObjectGraph.FromString(r.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    refs = {a.checkpoint_key for n in graph.nodes for a in n.attributes}
    assert refs <= keys and sum("/ExponentialMovingAverage/" in k for k in refs) == 8
    got_model, _ = restored("keras3", shadow, tf)
    for w, g in zip(want_model.weights, got_model.weights):
        assert bits(g.numpy()) == bits(w.numpy()), g.name
    maps.run_rename(maps.rename_plan(str(shadow), names.TO_ORIGINAL), str(back), "tf")
    g_back = tf.train.load_checkpoint(str(back)).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    g_mean = tf.train.load_checkpoint(str(mean)).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    assert pb.TrackableObjectGraph.FromString(g_back) == pb.TrackableObjectGraph.FromString(g_mean)


def test_graph_roles_in_process(tf, tmp_path, capsys):
    """Cases the training runs do not cover: a tf.keras legacy optimizer with
    slot variables saved as ``opt=``, an optimizer-only Keras 3 checkpoint (the
    model variables it tracks are parameters), the same optimizer as the
    checkpoint's root, and a corrupt object graph (a warning, then the name
    rules)."""
    import keras
    import tf_keras

    from ema_cli.formats import resolve_inputs, tf_fmt

    def roles(prefix):
        with tf_fmt.Reader(resolve_inputs([prefix])[0]) as r:
            return {n: r.role(i) for n, i in r.tensors().items()}, r.step()

    tf_keras.utils.set_random_seed(0)
    m = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])
    opt = tf_keras.optimizers.legacy.Adam(1e-2)
    m.compile(opt, "mse")
    m.fit(np.ones((8, 3), np.float32), np.ones((8, 2), np.float32), epochs=1, verbose=0)
    p = tf.train.Checkpoint(net=m, opt=opt).save(str(tmp_path / "legacy" / "ckpt"))
    got, step = roles(p)
    assert step == 1
    slots = {n: r for n, r in got.items() if ".OPTIMIZER_SLOT" in n}
    assert len(slots) == 4 and all(r.kind == "optimizer" and r.why.startswith("object graph: slot ") for r in
                                   slots.values())
    assert got["net/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"].kind == "parameter"
    assert {n for n, r in got.items() if r.kind == "optimizer" and n not in slots} == {
        f"opt/{v}/.ATTRIBUTES/VARIABLE_VALUE" for v in ("iter", "beta_1", "beta_2", "decay", "learning_rate")}

    keras.utils.set_random_seed(0)
    km = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    kopt = keras.optimizers.SGD(1e-2, momentum=0.9)
    km.compile(kopt, "mse")
    km.fit(np.ones((8, 3), np.float32), np.ones((8, 2), np.float32), epochs=1, verbose=0)
    p = tf.train.Checkpoint(sgd=kopt).save(str(tmp_path / "optonly" / "ckpt"))
    got, step = roles(p)
    assert step == 1
    params = sorted(n for n, r in got.items() if r.kind == "parameter")
    assert params == [f"sgd/_trainable_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE" for i in range(2)]
    assert all("tracked by the optimizer" in got[n].why for n in params)
    assert sum(r.kind == "optimizer" for r in got.values()) == len(kopt.variables)
    p = tf.train.Checkpoint(root=kopt).save(str(tmp_path / "optroot" / "ckpt"))
    got, step = roles(p)
    assert step == 1
    assert sorted(n for n, r in got.items() if r.kind == "parameter") == [
        f"_trainable_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE" for i in range(2)]
    assert sum(r.kind == "optimizer" for r in got.values()) == len(kopt.variables)

    # a corrupt graph: one warning, the name rules decide, averaging still works
    d = tmp_path / "corrupt"
    d.mkdir()
    v = tf.Variable(np.ones(3, np.float32))
    tf.raw_ops.SaveV2(prefix=str(d / "ckpt-1"), tensor_names=["_CHECKPOINTABLE_OBJECT_GRAPH", "w/.ATTRIBUTES/VARIABLE_VALUE"],
                      shape_and_slices=["", ""], tensors=[tf.constant(b"\xff\xff not a proto"), v])
    capsys.readouterr()
    doc = inspect_doc(d / "ckpt-1", cli=False)
    err = capsys.readouterr().err
    warns = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warns) == 1 and "_CHECKPOINTABLE_OBJECT_GRAPH" in warns[0] and str(d / "ckpt-1") in warns[0], err
    assert doc["averaged_from"] == "name rules"
    assert {r["name"]: r["role"] for r in doc["tensors"]}["w/.ATTRIBUTES/VARIABLE_VALUE"] == "averaged"
