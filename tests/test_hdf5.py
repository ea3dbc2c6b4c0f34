"""HDF5 / Keras acceptance (issue 4): real Keras 3 runs and real h5py files,
averaged through the real CLI in a subprocess; references computed here, in
float64, from the per-epoch weights read back with Keras or h5py."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURES, assert_clean_error, load_st, run_cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_spec = importlib.util.spec_from_file_location("gen_hdf5", FIXTURES / "gen_hdf5.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

DECAY = 0.6


# --------------------------------------------------------------------------- helpers


def ema_ref(values: list[np.ndarray], decay: float) -> np.ndarray:
    """TF ExponentialMovingAverage over the checkpoints in order, in float64
    (TF takes the decay as a float32: NOTES.md section 1)."""
    decay = float(np.float32(decay))
    e = np.asarray(values[0], dtype=np.float64)
    for x in values[1:]:
        e = decay * e + (1.0 - decay) * np.asarray(x, dtype=np.float64)
    return e


def mean_ref(values: list[np.ndarray]) -> np.ndarray:
    return sum(np.asarray(v, dtype=np.float64) for v in values) / len(values)


def assert_nearest(got: np.ndarray, ref64: np.ndarray, what: str = "") -> None:
    """``got`` is the representable value of its dtype nearest to ``ref64``
    (one correct rounding): no neighbour in that dtype is closer."""
    got = np.asarray(got)
    bits_t = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    bits = got.view(bits_t)
    g = got.astype(np.float64)
    err = np.abs(g - ref64)
    for nb in ((bits + bits_t(1)).view(got.dtype), (bits - bits_t(1)).view(got.dtype)):
        n = nb.astype(np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.isnan(n) | (err <= np.abs(n - ref64))
        assert ok.all(), (what, g[~ok][:5], ref64[~ok][:5])


def tree(path) -> dict:
    """Every object of an HDF5 file, in link order: kind, dtype, shape, chunks,
    filters and attributes (values as reprs)."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = ("group", {k: repr(f.attrs[k]) for k in f.attrs if k != "ema_avg"})

        def visit(name, obj):
            attrs = {k: repr(obj.attrs[k]) for k in obj.attrs}
            if isinstance(obj, h5py.Dataset):
                out[name] = ("dataset", str(obj.dtype), obj.shape, obj.chunks, obj.compression,
                             obj.compression_opts, obj.shuffle, attrs)
            else:
                out[name] = ("group", attrs)

        f.visititems(visit)
    return out


def read_h5(path, name) -> np.ndarray:
    with h5py.File(path, "r") as f:
        ds = f[name]
        a = ds[()]
        if ds.dtype.kind == "V" and ds.attrs.get("dtype") == "bfloat16":
            a = np.asarray(a).view(ml_dtypes.bfloat16)
        return np.asarray(a)


def datasets(path) -> list[str]:
    names = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".ema-avg-" in p.name], list(out.parent.iterdir())


def keras_state(weights_file: Path, dtype=None):
    """Model weights and optimizer variables of a .weights.h5, read by Keras."""
    m = gen.build_model(dtype)
    m.optimizer.build(m.trainable_variables)
    m.load_weights(weights_file)
    return [np.array(v.numpy()) for v in m.weights], [np.array(v.numpy()) for v in m.optimizer.variables]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A Keras 3 run (4 epochs), saved with save_weights and with model.save."""
    d = tmp_path_factory.mktemp("keras")
    gen.train_keras(d / "w", legacy_dir=d / "legacy")
    return d


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    tensors = [gen.write_plain(d / f"ckpt-{i}.h5", step, seed=i, drift=0.1 * i)
               for i, step in enumerate(gen.PLAIN_STEPS, start=1)]
    return d, tensors


# --------------------------------------------------------------------------- Keras 3 .weights.h5


def test_keras3_weights_ema_loads_in_keras_and_matches_reference(run, tmp_path):
    files = sorted((run / "w").glob("epoch-*.weights.h5"))
    assert len(files) == 4
    out = tmp_path / "avg.weights.h5"
    t0 = time.perf_counter()
    res = run_cli(*files, "-o", out, "--decay", DECAY, "--json")
    elapsed = time.perf_counter() - t0
    assert res.code == 0, res
    doc = res.json()
    assert [(c["step"], c["step_from"]) for c in doc["checkpoints"]] == [(s, "tensor") for s in (4, 8, 12, 16)]
    assert doc["format"] == "hdf5" and doc["tensors"]["averaged"] == 8
    print(f"ema-avg over 4 Keras checkpoints: {elapsed:.2f} s wall (subprocess), timings {doc['timings']}")

    per_epoch = [keras_state(f) for f in files]
    got_w, got_opt = keras_state(out)  # load_weights into a fresh model: no complaint
    for i, g in enumerate(got_w):
        ref = ema_ref([w[i] for w, _ in per_epoch], DECAY)
        assert g.dtype == np.float32
        assert_nearest(g, ref, f"weight {i}")
    # the optimizer state is the newest file's, exactly
    for g, want in zip(got_opt, per_epoch[-1][1]):
        assert np.array_equal(g, want)
    assert int(got_opt[0]) == 16  # iteration counter of epoch 4


def test_keras3_output_keeps_the_template_layout(run, tmp_path):
    files = sorted((run / "w").glob("epoch-*.weights.h5"))
    out = tmp_path / "avg.weights.h5"
    assert run_cli(*files, "-o", out, "--decay", DECAY, "--threads", "3").code == 0
    # every group, attribute and dataset (name, order, dtype, layout) as in the newest input
    assert tree(out) == tree(files[-1])
    assert datasets(out) == datasets(files[-1])
    with h5py.File(out) as f, h5py.File(files[-1]) as n:
        recipe = json.loads(f.attrs["ema_avg"])
        assert recipe["newest"] == str(files[-1])
        assert [c["step"] for c in recipe["checkpoints"]] == [4, 8, 12, 16]
        for name in datasets(out):
            same = f[name][()].tobytes() == n[name][()].tobytes()
            # optimizer state copied verbatim; model weights averaged
            assert same == name.startswith("optimizer/"), name


def test_keras3_bfloat16_model(tmp_path):
    """Keras 3 writes bf16 as 2-byte opaque + dtype="bfloat16": read, averaged
    in float64, rounded once, written back in the same convention."""
    files = gen.train_keras(tmp_path / "bf", epochs=3, dtype="bfloat16", seed=1, legacy_dir=tmp_path / "legacy")
    with h5py.File(files[0]) as f:
        ds = f["layers/dense/vars/0"]
        assert ds.dtype == np.dtype("V2") and ds.attrs["dtype"] == "bfloat16"
    out = tmp_path / "avg.weights.h5"
    res = run_cli(*files, "-o", out, "--verify")
    assert res.code == 0, res
    per_epoch = [keras_state(f, "bfloat16") for f in files]
    got_w, got_opt = keras_state(out, "bfloat16")
    for i, g in enumerate(got_w):
        assert g.dtype == ml_dtypes.bfloat16
        assert_nearest(g, mean_ref([w[i] for w, _ in per_epoch]), f"weight {i}")
    for g, want in zip(got_opt, per_epoch[-1][1]):
        assert g.tobytes() == want.tobytes()
    assert tree(out) == tree(files[-1])

    # Keras' legacy saver writes bf16 as opaque data WITHOUT the attribute (and
    # Keras 3.15 cannot load such a file back): ema-avg still reads it as bf16
    legacy = sorted((tmp_path / "legacy").glob("model-*.h5"))
    k = next(n for n in datasets(legacy[0]) if n.startswith("model_weights/dense/") and n.endswith("/kernel"))
    with h5py.File(legacy[0]) as f:
        assert f[k].dtype == np.dtype("V2") and "dtype" not in f[k].attrs
    out = tmp_path / "avg.h5"
    assert run_cli(*legacy, "-o", out, "--verify").code == 0
    vals = []
    for p in [*legacy, out]:
        with h5py.File(p) as f:
            vals.append(f[k][()].view(ml_dtypes.bfloat16))
    assert_nearest(vals[-1], mean_ref(vals[:-1]), k)
    assert tree(out) == tree(legacy[-1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_keras3_dtype_change_rebuilds_the_file(run, tmp_path, dtype):
    files = sorted((run / "w").glob("epoch-*.weights.h5"))
    out = tmp_path / "avg.weights.h5"
    res = run_cli(*files, "-o", out, "--dtype", dtype, "--verify")
    assert res.code == 0, res
    before, after = tree(files[-1]), tree(out)
    assert list(before) == list(after)  # same objects in the same order
    with h5py.File(out) as f:
        k = f["layers/dense/vars/0"]
        if dtype == "bfloat16":
            assert k.dtype == np.dtype("V2") and k.attrs["dtype"] == "bfloat16"
        else:
            assert k.dtype == np.float16 and "dtype" not in k.attrs
        assert f["optimizer/vars/2"].dtype == np.float32  # copied tensors keep their dtype
    assert out.stat().st_size < files[-1].stat().st_size  # rebuilt: no dead space left
    per_epoch = [keras_state(f) for f in files]
    got_w, _ = keras_state(out)  # Keras casts the narrower weights into the float32 model
    want_dt = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    for i, g in enumerate(got_w):
        assert_nearest(g.astype(want_dt), mean_ref([w[i] for w, _ in per_epoch]), f"weight {i}")


# --------------------------------------------------------------------------- legacy Keras .h5


def test_keras_legacy_h5_mean_loads_with_load_model(run, tmp_path):
    import keras

    files = sorted((run / "legacy").glob("model-*.h5"))
    out = tmp_path / "avg.h5"
    res = run_cli(*files, "-o", out, "--verify")
    assert res.code == 0, res
    plan = run_cli("plan", *files, "--json").json()
    assert [(c["step"], c["step_from"]) for c in plan["checkpoints"]] == [(s, "tensor") for s in (4, 8, 12, 16)]

    loaded = [keras.models.load_model(f) for f in files]
    m = keras.models.load_model(out)  # model_config, compile, optimizer weights: all accepted
    for i, v in enumerate(m.weights):
        ref = mean_ref([lm.weights[i].numpy() for lm in loaded])
        assert np.array_equal(v.numpy(), ref.astype(np.float32)), v.path  # 4 inputs: exact
    assert int(m.optimizer.iterations.numpy()) == 16
    # root attributes (model_config, keras_version, backend, ...) and the
    # optimizer weights are the newest file's
    assert tree(out) == tree(files[-1])
    with h5py.File(out) as f, h5py.File(files[-1]) as n:
        for k in n.attrs:
            assert f.attrs[k] == n.attrs[k], k
        assert "ema_avg" in f.attrs
        opt = [x for x in datasets(out) if x.startswith("optimizer_weights/")]
        assert opt and all(f[x][()].tobytes() == n[x][()].tobytes() for x in opt)


# --------------------------------------------------------------------------- plain HDF5


def test_plain_h5_mean_and_ema_match_reference_without_tensorflow(plain, tmp_path):
    d, tensors = plain
    files = sorted(d.glob("ckpt-*.h5"))
    for mode in ("mean", "ema"):
        out = tmp_path / f"{mode}.h5"
        args = ["--decay", DECAY] if mode == "ema" else []
        res = run_cli(*files, "-o", out, *args, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert res.code == 0, res
        imported = {ln.split("|")[-1].strip().split(".")[0] for ln in res.err.splitlines() if "import time:" in ln}
        assert "h5py" in imported and not imported & {"tensorflow", "keras", "torch"}
        ref_fn = mean_ref if mode == "mean" else (lambda v: ema_ref(v, DECAY))
        for name in ("model/encoder/kernel", "model/encoder/bias", "model/encoder/embedding", "model/head/kernel"):
            got = read_h5(out, name)
            assert got.dtype == tensors[-1][name].dtype, name
            assert_nearest(got, ref_fn([t[name] for t in tensors]), name)
        # ints, step and optimizer state: the newest file's
        for name in ("model/head/vocab_ids", "step", "optimizer/momentum"):
            assert np.array_equal(read_h5(out, name), tensors[-1][name]), name
        assert tree(out) == tree(files[-1])  # chunks, gzip, shuffle, attributes kept


def test_hdf5_to_safetensors_to_hdf5_keeps_names_and_values(plain, tmp_path):
    d, tensors = plain
    src = d / "ckpt-2.h5"
    st = tmp_path / "x.safetensors"
    back = tmp_path / "back.h5"
    assert run_cli(src, "-o", st, "--verify").code == 0
    got, meta = load_st(st)
    assert set(got) == set(tensors[1]) and "ema_avg" in meta
    for k, v in tensors[1].items():
        assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), k
    res = run_cli(st, "-o", back, "--verify")
    assert res.code == 0, res
    assert sorted(datasets(back)) == sorted(tensors[1])
    for k, v in tensors[1].items():
        assert read_h5(back, k).tobytes() == v.tobytes(), k
    with h5py.File(back) as f:
        e = f["model/encoder/embedding"]
        assert e.dtype == np.dtype("V2") and e.attrs["dtype"] == "bfloat16"  # Keras 3's convention
        assert json.loads(f.attrs["ema_avg"])["checkpoints"][0]["path"] == str(st)
    # and the fresh file reads back as the same checkpoint
    insp = run_cli("inspect", back, "--json").json()
    assert {t["name"]: t["dtype"] for t in insp["tensors"]}["model/encoder/embedding"] == "bfloat16"
    assert insp["step"] == 200


def test_strings_and_non_tensor_datasets(tmp_path):
    """String datasets are copied; datasets of types that are not tensors
    (compound) are not listed but survive in an HDF5 output."""
    paths = []
    for i in (1, 2):
        p = tmp_path / f"s-{i}.h5"
        with h5py.File(p, "w") as f:
            f["w"] = np.full(3, float(i), np.float32)
            f["names"] = np.array([b"a", b"bc"], dtype=object)
            f["table"] = np.array([(i, 2.0)], dtype=[("a", "i4"), ("b", "f8")])
        paths.append(p)
    out = tmp_path / "out.h5"
    assert run_cli(*paths, "-o", out, "--verify").code == 0
    assert np.array_equal(read_h5(out, "w"), np.full(3, 1.5, np.float32))
    assert list(read_h5(out, "names")) == [b"a", b"bc"]
    assert read_h5(out, "table")["a"][0] == 2
    insp = run_cli("inspect", paths[0], "--json").json()
    assert [t["name"] for t in insp["tensors"]] == ["names", "w"]


def test_fresh_file_strings_keep_their_bytes(tmp_path):
    """Strings only reach a fresh HDF5 file from TF checkpoints, whose object
    graph is binary: bytes with NUL survive (HDF5 strings would cut them)."""
    from ema_cli.formats import hdf5_fmt
    from ema_cli.formats.base import Source, TensorInfo

    vals = {"graph": np.array(b"\x00\x01proto\x00", dtype=object),
            "vocab": np.array([b"a", "\u00e9".encode(), b""], dtype=object)}
    infos = [TensorInfo(k, "string", v.shape) for k, v in vals.items()]
    out = tmp_path / "s.h5"
    w = hdf5_fmt.Writer(str(out), [infos], {"ema_avg": "{}"})
    for k, v in vals.items():
        w.write(k, v)
    w.close()
    r = hdf5_fmt.Reader(Source("hdf5", str(out), (str(out),)))
    try:
        assert {k: i.dtype for k, i in r.tensors().items()} == {"graph": "string", "vocab": "string"}
        for k, v in vals.items():
            got = r.read(k)
            assert got.shape == v.shape and list(got.reshape(-1)) == list(v.reshape(-1)), k
    finally:
        r.close()


# --------------------------------------------------------------------------- errors


def test_not_hdf5_among_valid_files_is_a_clean_error(run, tmp_path):
    files = sorted((run / "w").glob("epoch-*.weights.h5"))
    bad = tmp_path / "epoch-9.weights.h5"
    bad.write_bytes(b"this is not an HDF5 file\n" * 20)
    out = tmp_path / "avg.weights.h5"
    assert_clean_error(run_cli(*files, bad, "-o", out), str(bad), "not an HDF5 file", code=1)
    nothing_written(out)
    # a truncated HDF5 file: signature present, the rest missing
    trunc = tmp_path / "epoch-8.weights.h5"
    trunc.write_bytes(files[0].read_bytes()[:3000])
    assert_clean_error(run_cli(*files, trunc, "-o", out), str(trunc), code=1)
    nothing_written(out)


def _external_link(f, tmp):
    with h5py.File(tmp / "other.h5", "w") as o:
        o["x"] = np.zeros(3, np.float32)
    f["ext"] = h5py.ExternalLink(str(tmp / "other.h5"), "/x")


def _soft_link(f, tmp):
    f["alias"] = h5py.SoftLink("/w")


def _external_storage(f, tmp):
    (tmp / "raw.bin").write_bytes(np.zeros(3, np.float32).tobytes())
    f.create_dataset("ext", shape=(3,), dtype=np.float32, external=[(str(tmp / "raw.bin"), 0, 12)])


def _virtual(f, tmp):
    layout = h5py.VirtualLayout(shape=(3,), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(tmp / "other.h5"), "x", shape=(3,))
    f.create_virtual_dataset("virt", layout)


@pytest.mark.parametrize("make,needle", [
    (_external_link, "external link"), (_soft_link, "soft link"),
    (_external_storage, "external file"), (_virtual, "virtual dataset"),
])
def test_links_and_external_data_are_refused(tmp_path, make, needle):
    good = tmp_path / "a-1.h5"
    with h5py.File(good, "w") as f:
        f["w"] = np.ones(3, np.float32)
    bad = tmp_path / "a-2.h5"
    with h5py.File(bad, "w") as f:
        f["w"] = np.ones(3, np.float32)
        make(f, tmp_path)
    out = tmp_path / "avg.h5"
    assert_clean_error(run_cli(good, bad, "-o", out), str(bad), needle, code=1)
    nothing_written(out)


def test_options_hdf5_output_cannot_honour(run, tmp_path):
    files = sorted((run / "w").glob("epoch-*.weights.h5"))
    out = tmp_path / "avg.h5"
    assert_clean_error(run_cli(*files, "-o", out, "--max-shard-size", "64B"), "single file", code=2)
    nothing_written(out)
    assert_clean_error(run_cli(*files, "-o", out, "--names", "shadow", "--decay", "0.9"), "not datasets of")
    nothing_written(out)
    # a .keras archive that is a corrupt zip: one line naming it
    k = tmp_path / "model.keras"
    k.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert_clean_error(run_cli(k, "-o", out), str(k))
    nothing_written(out)


# --------------------------------------------------------------------------- steps, threads


def test_step_sources(tmp_path):
    # no counter: the number in the file name; LossScaleOptimizer layout: the inner counter
    for n, it in ((3, 30), (12, 120), (7, 70)):
        with h5py.File(tmp_path / f"epoch-{n}.weights.h5", "w") as f:
            f["layers/dense/vars/0"] = np.full(2, n, np.float32)
    plan = run_cli("plan", tmp_path, "--json").json()
    assert [(c["step"], c["step_from"]) for c in plan["checkpoints"]] == [(3, "name"), (7, "name"), (12, "name")]
    lso = tmp_path / "lso"
    lso.mkdir()
    for n, it in ((1, 40), (2, 80)):
        with h5py.File(lso / f"x{n}.weights.h5", "w") as f:
            f["layers/dense/vars/0"] = np.full(2, n, np.float32)
            f["optimizer/vars/0"] = np.int64(0)  # the wrapper's own counter stays 0
            f["optimizer/inner_optimizer/vars/0"] = np.int64(it)
    plan = run_cli("plan", lso, "--json").json()
    assert [(c["step"], c["step_from"]) for c in plan["checkpoints"]] == [(40, "tensor"), (80, "tensor")]


def test_many_datasets_with_threads(tmp_path):
    rng = np.random.default_rng(5)
    files, vals = [], []
    for i in range(3):
        p = tmp_path / f"c-{i}.h5"
        t = {f"g{j % 7}/sub{j % 3}/t{j}": rng.standard_normal((5, j % 4 + 1)).astype(np.float32) for j in range(120)}
        with h5py.File(p, "w") as f:
            for k, v in t.items():
                f[k] = v
        files.append(p)
        vals.append(t)
    out = tmp_path / "out.h5"
    res = run_cli(*files, "-o", out, "--threads", "4", "--verify")
    assert res.code == 0, res
    for k in vals[0]:
        assert_nearest(read_h5(out, k), mean_ref([v[k] for v in vals]), k)


def _odd_file(path: Path, i: int) -> None:
    with h5py.File(path, "w", userblock_size=512, track_order=True) as f:
        f.attrs["zz"] = "first attribute"
        f.attrs["aa"] = np.arange(3)
        f["zbig"] = np.arange(6, dtype=">f4") * i
        f["aenum"] = np.array([0, 1, 2], dtype=h5py.enum_dtype({"a": 0, "b": 1, "c": 2}, basetype="i1"))
        g = f.create_group("g", track_order=True)
        g["z"] = np.ones(3, "f4") * i
        g["a"] = np.ones(3, "f4") * 2 * i
        g["alias"] = g["z"]  # a second hard link to the same dataset
        g["loop"] = f["g"]  # and a group that contains itself
        f.create_dataset("fill", shape=(4,), dtype="f4", fillvalue=7.0, chunks=(2,), compression="gzip")
        f["fill"][:2] = i
        f.create_dataset("nothing", data=h5py.Empty("f4"))
    with open(path, "r+b") as fh:
        fh.write(b"USERBLOCK")


@pytest.mark.parametrize("dtype", ["keep", "float16", "bfloat16"])
def test_odd_layouts_survive_in_place_and_rebuilt(tmp_path, dtype):
    """Track-order groups, attribute order, hard links, a group cycle, fill
    values, filters, enums, big-endian data, empty dataspaces and a user block
    come out as they went in, whether the file is copied (--dtype keep) or
    rebuilt (a new dtype)."""
    files = [tmp_path / f"odd-{i}.h5" for i in (1, 2)]
    for i, p in enumerate(files, start=1):
        _odd_file(p, i)
    out = tmp_path / "out.h5"
    res = run_cli(*files, "-o", out, "--dtype", dtype, "--verify")
    assert res.code == 0, res
    assert out.read_bytes()[:9] == b"USERBLOCK"
    with h5py.File(out) as f, h5py.File(files[1]) as n:
        assert list(f) == list(n) == ["zbig", "aenum", "g", "fill", "nothing"]
        assert list(f["g"]) == ["z", "a", "alias", "loop"]
        assert list(f.attrs) == ["zz", "aa", "ema_avg"]
        assert f["g/alias"].id == f["g/z"].id and f["g/loop"].id == f["g"].id
        assert h5py.check_enum_dtype(f["aenum"].dtype) == {"a": 0, "b": 1, "c": 2}
        assert f["fill"].chunks == (2,) and f["fill"].compression == "gzip"
        assert f["nothing"].shape is None
        want = {"keep": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
        z = read_h5(out, "zbig")
        assert z.dtype == want and np.array_equal(z.astype(np.float64), np.arange(6) * 1.5)
        fill = read_h5(out, "fill")
        assert np.array_equal(fill.astype(np.float64), [1.5, 1.5, 7.0, 7.0])  # fill value carried over


def test_keras_weights_to_tf_checkpoint(run, tmp_path):
    """HDF5 inputs written as a TF checkpoint: same names, same values as the
    HDF5 output of the same recipe."""
    pytest.importorskip("ema_cli.formats.tf_fmt")
    import tensorflow as tf

    files = sorted((run / "w").glob("epoch-*.weights.h5"))
    h5out, tfout = tmp_path / "avg.weights.h5", tmp_path / "tf" / "avg.ckpt"
    tfout.parent.mkdir()
    assert run_cli(*files, "-o", h5out, "--decay", DECAY).code == 0
    res = run_cli(*files, "-o", tfout, "--decay", DECAY, "--verify")
    assert res.code == 0, res
    ck = tf.train.load_checkpoint(str(tfout))
    names = datasets(h5out)
    assert set(ck.get_variable_to_shape_map()) == set(names)
    for n in names:
        assert np.array_equal(ck.get_tensor(n), read_h5(h5out, n)), n


def test_failure_after_the_template_copy_leaves_nothing(tmp_path):
    """A NaN found while averaging (the template already copied to staging):
    one error line, no output, no staging file."""
    files = []
    for i in (1, 2):
        p = tmp_path / f"n-{i}.h5"
        with h5py.File(p, "w") as f:
            f["a"] = np.ones(4, np.float32)
            f["b"] = np.array([1.0, np.nan if i == 1 else 2.0, 3.0], np.float32)
        files.append(p)
    out = tmp_path / "out.h5"
    assert_clean_error(run_cli(*files, "-o", out), str(files[0]), "'b'", "NaN", code=1)
    nothing_written(out)
