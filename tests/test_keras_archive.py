"""Keras archives (``.keras``), Keras sharded weights (``.weights.json``) and the
roles of Keras HDF5 tensors (issue 10).  Every checkpoint is written by real
Keras 3 in this file (``fit``, ``model.save``, ``save_weights(max_shard_size=)``,
``ModelCheckpoint``); the CLI runs in a subprocess; references are float64
means of what Keras itself loads back, and Keras loads every output."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import assert_clean_error, load_st, run_cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EPOCHS = 3
STEPS_PER_EPOCH = 4  # 64 samples, batch 16
SHARD_GB = 700 / 1024**3  # Keras' max_shard_size is in GB: a few shards for this tiny model


# --------------------------------------------------------------------------- helpers


def build_model():
    """Dense, BatchNormalization (renamed: Keras names its weights group after the
    class anyway), Dense, BatchNormalization without beta, Dense; Adam."""
    import keras

    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu", name="dense"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(8, name="hidden"),
        keras.layers.BatchNormalization(center=False, name="norm2"),
        keras.layers.Dense(2, name="head"),
    ], name="model")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.MeanSquaredError())
    return model


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = np.stack([x[:, 0] - 2 * x[:, 1], x[:, 2] * x[:, 3]], axis=1).astype(np.float32)
    return x, y


def weights_of(model) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in model.weights]


def mean64(states: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [sum(np.asarray(s[i], dtype=np.float64) for s in states) / len(states) for i in range(len(states[0]))]


def assert_nearest(got: np.ndarray, ref64: np.ndarray, what: str = "") -> None:
    """``got`` (float32) is the float32 nearest to ``ref64``: rounded once."""
    got = np.asarray(got, dtype=np.float32)
    g = got.astype(np.float64)
    err = np.abs(g - ref64)
    bits = got.view(np.uint32)
    for nb in ((bits + np.uint32(1)).view(np.float32), (bits - np.uint32(1)).view(np.float32)):
        ok = err <= np.abs(nb.astype(np.float64) - ref64)
        assert ok.all(), (what, g[~ok][:5], ref64[~ok][:5])


def assert_weights_are_mean(model, inputs_states, what=""):
    ref = mean64(inputs_states)
    got = weights_of(model)
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape
        assert_nearest(g, r, f"{what} weight {i} ({model.weights[i].path})")


def listing(*dirs: Path) -> dict[str, set[str]]:
    return {str(d): {p.name for p in d.iterdir()} for d in dirs}


def nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".ema-avg-" in p.name], list(out.parent.iterdir())


def h5_member(archive: Path) -> h5py.File:
    """The weights of a .keras, opened the way Keras does (h5py on zipfile's reader)."""
    return h5py.File(zipfile.ZipFile(archive).open("model.weights.h5"), "r")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One Keras run, one epoch at a time; after each epoch ``model.save`` to
    ``keras/model-E.keras`` and ``save_weights(max_shard_size=...)`` to
    ``sharded/w-E.weights.json``; the weights as Keras holds them."""
    import keras

    d = tmp_path_factory.mktemp("karchive")
    (d / "keras").mkdir()
    (d / "sharded").mkdir()
    keras.utils.set_random_seed(0)
    x, y = data()
    model = build_model()
    states = []
    for e in range(1, EPOCHS + 1):
        model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
        model.save(d / "keras" / f"model-{e}.keras")
        model.save_weights(d / "sharded" / f"w-{e}.weights.json", max_shard_size=SHARD_GB)
        states.append(weights_of(model))
    return d, states


def fresh_model():
    m = build_model()
    m.optimizer.build(m.trainable_variables)
    return m


# --------------------------------------------------------------------------- .keras in and out


def test_keras_in_keras_out_loads_and_is_the_mean_without_extraction(run, tmp_path):
    import keras

    d, states = run
    inputs = sorted((d / "keras").glob("model-*.keras"))
    # the inputs as Keras loads them are the reference (and agree with the run)
    loaded = [weights_of(keras.models.load_model(p)) for p in inputs]
    for a, b in zip(loaded, states):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for p in inputs:  # Keras stores the weights uncompressed: ema-avg reads them in place
        assert zipfile.ZipFile(p).getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = d / "keras" / "avg.keras"  # written among the inputs: only it may appear there
    before = listing(d / "keras", tmp)
    res = run_cli(*inputs, "-o", out, "--json", env={"TMPDIR": str(tmp)})
    assert res.code == 0, res
    after = listing(d / "keras", tmp)
    assert after[str(tmp)] == before[str(tmp)] == set()
    assert after[str(d / "keras")] == before[str(d / "keras")] | {"avg.keras"}
    doc = res.json()
    assert doc["format"] == "keras"
    assert [(c["step"], c["step_from"]) for c in doc["checkpoints"]] == [
        (STEPS_PER_EPOCH * e, "tensor") for e in range(1, EPOCHS + 1)]

    try:
        model = keras.models.load_model(out)
        assert_weights_are_mean(model, loaded, ".keras")
        # the optimizer state is the newest input's
        newest = keras.models.load_model(inputs[-1])
        assert int(model.optimizer.iterations.numpy()) == STEPS_PER_EPOCH * EPOCHS
        for a, b in zip(model.optimizer.variables, newest.optimizer.variables):
            assert np.array_equal(a.numpy(), b.numpy()), a.path
        # written as Keras writes it: same members in the same order, stored; config and metadata verbatim
        zo, zn = zipfile.ZipFile(out), zipfile.ZipFile(inputs[-1])
        assert zo.namelist() == zn.namelist() == ["metadata.json", "config.json", "model.weights.h5"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zo.infolist())
        assert zo.read("config.json") == zn.read("config.json")
        assert zo.read("metadata.json") == zn.read("metadata.json")
        assert zo.testzip() is None  # every CRC right
        with h5_member(out) as f:
            recipe = json.loads(f.attrs["ema_avg"])
            assert recipe["newest"] == str(inputs[-1])
        # and our output is an input like any other
        res = run_cli(out, "--json", "-o", tmp_path / "again.safetensors")
        assert res.code == 0, res
    finally:
        out.unlink(missing_ok=True)


def test_keras_in_safetensors_and_weights_h5_out(run, tmp_path):
    import keras

    d, states = run
    inputs = sorted((d / "keras").glob("model-*.keras"))
    st = tmp_path / "avg.safetensors"
    wh5 = tmp_path / "avg.weights.h5"
    assert run_cli(*inputs, "-o", st).code == 0
    assert run_cli(*inputs, "-o", wh5).code == 0

    model = keras.models.load_model(inputs[0])
    model.load_weights(wh5)
    assert_weights_are_mean(model, states, ".weights.h5")

    tensors, meta = load_st(st)
    assert "ema_avg" in meta
    members = [h5_member(p) for p in inputs]
    try:
        names = []
        members[0].visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert set(tensors) == set(names)
        with h5py.File(wh5) as f:
            for n in names:
                vals = [m[n][()] for m in members]
                if n.startswith("optimizer/"):  # copied from the newest
                    assert np.array_equal(tensors[n], vals[-1]), n
                else:
                    assert_nearest(tensors[n], mean64([[v] for v in vals])[0], n)
                assert np.array_equal(tensors[n], f[n][()]), n  # both outputs agree
    finally:
        for m in members:
            m.close()


def test_deflated_archive_is_streamed_with_the_same_result(run, tmp_path):
    """A .keras someone re-zipped with deflate: no bytes in place, read through
    zipfile; same averages as the stored originals."""
    import keras

    d, states = run
    inputs = sorted((d / "keras").glob("model-*.keras"))
    deflated = []
    for p in inputs:
        q = tmp_path / p.name
        with zipfile.ZipFile(p) as src, zipfile.ZipFile(q, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))
        assert zipfile.ZipFile(q).getinfo("model.weights.h5").compress_type == zipfile.ZIP_DEFLATED
        deflated.append(q)
    from ema_cli.formats import keras_fmt
    from ema_cli.formats.base import Source

    for p, in_place in ((inputs[0], True), (deflated[0], False)):
        with keras_fmt.Reader(Source("keras", str(p), (str(p),))) as r:
            assert r.extras()["weights_in_place"] is in_place
    out = tmp_path / "out" / "avg.keras"
    out.parent.mkdir()
    res = run_cli(*deflated, "-o", out)
    assert res.code == 0, res
    model = keras.models.load_model(out)
    assert_weights_are_mean(model, states, "deflated")


def test_hdf5_hardening_applies_inside_the_archive(run, tmp_path):
    """The weights file of a .keras gets every check a .h5 gets: a soft link in
    it is refused, naming the archive."""
    d, _ = run
    src = sorted((d / "keras").glob("model-*.keras"))[-1]
    inner = tmp_path / "inner.h5"
    with zipfile.ZipFile(src) as z:
        inner.write_bytes(z.read("model.weights.h5"))
    with h5py.File(inner, "r+") as f:
        f["layers/dense/vars/2"] = h5py.SoftLink("/layers/head/vars/0")
    bad = tmp_path / "linked.keras"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(bad, "w") as out:
        for info in z.infolist():
            data = inner.read_bytes() if info.filename == "model.weights.h5" else z.read(info.filename)
            out.writestr(info.filename, data)
    out = tmp_path / "avg.keras"
    res = run_cli(src, bad, "-o", out)
    assert_clean_error(res, str(bad), "soft link")
    nothing_written(out)


# --------------------------------------------------------------------------- sharded weights


def test_sharded_weights_in_and_out(run, tmp_path):
    d, states = run
    sdir = d / "sharded"
    idx = sorted(sdir.glob("w-*.weights.json"))
    shards = sorted(sdir.glob("w-3_*.weights.h5"))
    assert len(idx) == EPOCHS and len(shards) >= 2, sorted(p.name for p in sdir.iterdir())

    # the directory, or any shard file or the index: each checkpoint once
    out = tmp_path / "avg.weights.json"
    for args in ([sdir], [sdir / "w-1_00000.weights.h5", sdir / "w-2_00001.weights.h5", idx[2]]):
        res = run_cli("plan", *args, "--json") if args[0] == sdir else run_cli(*args, "-o", out, "--json")
        assert res.code == 0, res
        cks = res.json()["checkpoints"]
        assert [c["path"] for c in cks] == [str(p) for p in idx], args
        assert [c["step"] for c in cks] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    # the newest input's shard layout, under the output's name
    got = sorted(p.name for p in tmp_path.iterdir())
    assert got == ["avg.weights.json"] + [s.name.replace("w-3_", "avg_") for s in shards], got
    index = json.loads(out.read_text())
    tmpl = json.loads(idx[-1].read_text())
    assert {k: [f.replace("w-3_", "avg_") for f in v] for k, v in tmpl["weight_map"].items()} == index["weight_map"]

    model = fresh_model()
    model.load_weights(out)
    assert_weights_are_mean(model, states, "sharded")
    assert int(model.optimizer.iterations.numpy()) == STEPS_PER_EPOCH * EPOCHS

    # sharded in, one file out; one file in, sharded out (with --max-shard-size packing)
    one = tmp_path / "one.weights.h5"
    assert run_cli(*idx, "-o", one).code == 0
    model = fresh_model()
    model.load_weights(one)
    assert_weights_are_mean(model, states, "sharded -> .weights.h5")
    again = tmp_path / "again" / "re.weights.json"
    again.parent.mkdir()
    res = run_cli(one, "-o", again, "--max-shard-size", "600B", "--json")
    assert res.code == 0, res
    assert len(list(again.parent.glob("re_*.weights.h5"))) >= 2
    model = fresh_model()
    model.load_weights(again)
    assert_weights_are_mean(model, states, ".weights.h5 -> sharded")

    # an existing sharded output is refused without --force; with it, replaced whole
    res = run_cli(*idx, "-o", out)
    assert_clean_error(res, "output exists")
    assert run_cli(*idx, "-o", out, "--force", "--decay", "0.5").code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("avg")) == got


def test_missing_shard_is_a_clean_error(run, tmp_path):
    d, _ = run
    for f in (d / "sharded").glob("w-2*"):
        shutil.copy(f, tmp_path / f.name)
    victim = sorted(tmp_path.glob("w-2_*.weights.h5"))[-1]
    victim.unlink()
    out = tmp_path / "avg.weights.json"
    res = run_cli(d / "sharded" / "w-1.weights.json", tmp_path / "w-2.weights.json", "-o", out)
    assert_clean_error(res, "w-2.weights.json", victim.name, "missing")
    nothing_written(out)


# --------------------------------------------------------------------------- roles


def test_roles_of_batchnorm_kernels_and_optimizer(run):
    d, _ = run
    archive = d / "keras" / "model-1.keras"
    weights_file = d / "sharded" / "w-1.weights.json"
    for ckpt in (archive, weights_file):
        res = run_cli("inspect", ckpt, "--json")
        assert res.code == 0, res
        rows = {t["name"]: t for t in res.json()["tensors"]}
        kinds = {n: t["kind"] for n, t in rows.items()}
        # bn (renamed; group batch_normalization): gamma, beta, moving_mean, moving_variance
        assert [kinds[f"layers/batch_normalization/vars/{i}"] for i in range(4)] == [
            "parameter", "parameter", "buffer", "buffer"], ckpt
        # norm2 (center=False): gamma, moving_mean, moving_variance
        assert [kinds[f"layers/batch_normalization_1/vars/{i}"] for i in range(3)] == [
            "parameter", "buffer", "buffer"], ckpt
        assert "moving_mean" in rows["layers/batch_normalization/vars/2"]["why"]
        assert "moving_variance" in rows["layers/batch_normalization_1/vars/2"]["why"]
        assert "BatchNormalization" in rows["layers/batch_normalization/vars/3"]["why"]
        for layer in ("dense", "dense_1", "dense_2"):
            assert kinds[f"layers/{layer}/vars/0"] == kinds[f"layers/{layer}/vars/1"] == "parameter"
        assert kinds["optimizer/vars/0"] == "counter"
        opt = [n for n in kinds if n.startswith("optimizer/vars/") and n != "optimizer/vars/0"]
        assert len(opt) > 10 and all(kinds[n] == "optimizer" for n in opt)
        assert all(rows[n]["role"] == "copied" for n in opt + ["optimizer/vars/0"])
        assert all(rows[n]["role"] == "averaged" for n in kinds if n.startswith("layers/"))
    # with config.json the layer's class and options are known: its real names
    res = run_cli("inspect", archive, "--json").json()
    rows = {t["name"]: t for t in res["tensors"]}
    assert rows["layers/batch_normalization_1/vars/0"]["why"] == "keras layer BatchNormalization: gamma"
    assert rows["layers/batch_normalization/vars/2"]["why"] == "keras layer BatchNormalization: moving_mean"
    assert rows["layers/dense_1/vars/0"]["why"].startswith("keras layer Dense")


def test_roles_of_a_legacy_h5(tmp_path):
    x, y = data()
    model = build_model()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    p = tmp_path / "model-1.h5"
    model.save(p)
    res = run_cli("inspect", p, "--json")
    assert res.code == 0, res
    rows = {t["name"]: t for t in res.json()["tensors"]}
    buffers = sorted(n for n, t in rows.items() if t["kind"] == "buffer")
    assert sorted(n.rsplit("/", 1)[1].split(":")[0] for n in buffers) == ["moving_mean", "moving_mean",
                                                                         "moving_variance", "moving_variance"]
    assert all("BatchNormalization" in rows[n]["why"] for n in buffers)
    kernels = [n for n in rows if n.endswith("kernel") and n.startswith("model_weights/")]
    assert len(kernels) == 3 and all(rows[n]["kind"] == "parameter" for n in kernels)
    assert all(t["kind"] in ("optimizer", "counter") for n, t in rows.items() if n.startswith("optimizer_weights/"))
    counters = [n for n, t in rows.items() if t["kind"] == "counter"]
    assert len(counters) == 1 and counters[0].startswith("optimizer_weights/adam") and counters[0].endswith("/iteration")


# --------------------------------------------------------------------------- corrupt archives


@pytest.fixture
def bad_archives(run, tmp_path):
    d, _ = run
    src = sorted((d / "keras").glob("model-*.keras"))[-1]
    raw = src.read_bytes()
    out = {}
    (tmp_path / "not-a-zip.keras").write_text("this is not a zip file\n")
    out["not a zip"] = (tmp_path / "not-a-zip.keras", "zip")
    nw = tmp_path / "no-weights.keras"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(nw, "w") as o:
        for info in z.infolist():
            if info.filename != "model.weights.h5":
                o.writestr(info.filename, z.read(info.filename))
    out["no weights"] = (nw, "model.weights.h5")
    (tmp_path / "truncated.keras").write_bytes(raw[: len(raw) // 2])
    out["truncated"] = (tmp_path / "truncated.keras", "zip")
    # the central directory intact, the weights' HDF5 superblock overwritten
    info = zipfile.ZipFile(src).getinfo("model.weights.h5")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    garbled = bytearray(raw)
    garbled[start:start + 64] = b"\x00" * 64
    (tmp_path / "garbled.keras").write_bytes(bytes(garbled))
    out["garbled weights"] = (tmp_path / "garbled.keras", "HDF5")
    return src, out


@pytest.mark.parametrize("case", ["not a zip", "no weights", "truncated", "garbled weights"])
def test_corrupt_archive_is_one_line_and_nothing_written(bad_archives, tmp_path, case):
    good, cases = bad_archives
    bad, needle = cases[case]
    out = tmp_path / "out" / "avg.keras"
    out.parent.mkdir()
    res = run_cli(good, bad, "-o", out)
    assert_clean_error(res, str(bad), needle)
    nothing_written(out)
    res = run_cli("inspect", bad)
    assert_clean_error(res, str(bad))


def test_keras_output_needs_a_keras_template(run, tmp_path):
    d, _ = run
    out = tmp_path / "avg.keras"
    res = run_cli(*sorted((d / "sharded").glob("*.weights.json")), "-o", out)
    assert_clean_error(res, str(out), "config.json")
    nothing_written(out)
    res = run_cli(*sorted((d / "keras").glob("*.keras")), "-o", out, "--max-shard-size", "1KB")
    assert_clean_error(res, "one archive")
    nothing_written(out)


# --------------------------------------------------------------------------- ModelCheckpoint names


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """ModelCheckpoint("weights.{epoch:02d}-{val_loss:.2f}.weights.h5"), 4 epochs:
    the last number in each name is val_loss's digits, not the epoch."""
    import keras

    d = tmp_path_factory.mktemp("mcp")
    keras.utils.set_random_seed(1)
    x, y = data(1)
    xv, yv = data(2)
    model = build_model()
    states = []

    class Keep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            states.append(weights_of(self.model))

    cb = keras.callbacks.ModelCheckpoint(str(d / "weights.{epoch:02d}-{val_loss:.2f}.weights.h5"),
                                         save_weights_only=True)
    model.fit(x, y, validation_data=(xv, yv), epochs=4, batch_size=16, shuffle=False, verbose=0,
              callbacks=[cb, Keep()])
    files = sorted(d.glob("weights.*.weights.h5"))
    assert len(files) == 4
    return d, files, states


def test_model_checkpoint_names_ema_in_epoch_order(checkpointed, tmp_path):
    d, files, states = checkpointed
    shuffled = [files[2], files[0], files[3], files[1]]
    res = run_cli("plan", *shuffled, "--decay", "0.6", "--json")
    assert res.code == 0, res
    cks = res.json()["checkpoints"]
    assert [c["path"] for c in cks] == [str(f) for f in files]  # epoch order, whatever val_loss says
    assert [c["step"] for c in cks] == [STEPS_PER_EPOCH * e for e in range(1, 5)]

    out = tmp_path / "ema.weights.h5"
    assert run_cli(*shuffled, "-o", out, "--decay", "0.6").code == 0
    model = fresh_model()
    model.load_weights(out)
    decay = float(np.float32(0.6))
    ref = [np.asarray(w, dtype=np.float64) for w in states[0]]
    for s in states[1:]:
        ref = [decay * r + (1 - decay) * np.asarray(w, dtype=np.float64) for r, w in zip(ref, s)]
    for i, (g, r) in enumerate(zip(weights_of(model), ref)):
        assert_nearest(g, r, f"weight {i}")


def test_model_checkpoint_name_gives_the_epoch(checkpointed):
    """The file name alone (no counter tensor consulted): ``weights.03-0.35``
    is epoch 3; a float is never a step."""
    from ema_cli import engine

    _, files, _ = checkpointed
    assert [engine.step_from_name(f.name) for f in files] == [1, 2, 3, 4], [f.name for f in files]


def test_bfloat16_archive_stored_and_deflated_agree(tmp_path):
    """Keras 3 tags bf16 weights with a variable-length dtype attribute (global
    heaps, parsed before they are read): in place (stored) and streamed
    (deflated), the same averages, and Keras loads both."""
    import keras

    keras.utils.set_random_seed(3)
    x, y = data(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, dtype="bfloat16", name="d"),
                              keras.layers.Dense(2, name="out")])
    model.compile(optimizer="sgd", loss=keras.losses.MeanSquaredError())
    stored, deflated = [], []
    for e in (1, 2):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        p = tmp_path / f"bf-{e}.keras"
        model.save(p)
        q = tmp_path / "z" / p.name
        q.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(p) as src, zipfile.ZipFile(q, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))
        stored.append(p)
        deflated.append(q)
    outs = []
    for name, inputs in (("a", stored), ("b", deflated)):
        out = tmp_path / f"{name}.keras"
        res = run_cli(*inputs, "-o", out)
        assert res.code == 0, res
        outs.append(out)
    with h5_member(outs[0]) as a, h5_member(outs[1]) as b:
        assert a["layers/dense/vars/0"].attrs["dtype"] == "bfloat16"
        for n in ("layers/dense/vars/0", "layers/dense/vars/1", "layers/dense_1/vars/0"):
            assert a[n][()].tobytes() == b[n][()].tobytes(), n
    ins = [weights_of(keras.models.load_model(p)) for p in stored]
    got = weights_of(keras.models.load_model(outs[1]))
    ref = mean64(ins)
    for g, r in zip(got, ref):
        assert np.abs(g.astype(np.float64) - r).max() <= np.abs(r).max() * 2**-8
