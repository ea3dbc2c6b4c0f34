"""The TensorFlow-free tensor-bundle reader and writer (ema_cli/formats/tf_bundle.py),
against TensorFlow itself: TensorFlow writes the inputs, and is the oracle for
what the reader returns and for whether the writer's output restores.

* every fixture and every checkpoint TensorFlow, Keras 3 and tf.keras write here
  (TF1 Saver with a partitioned variable, TF2 ``tf.train.Checkpoint`` /
  ``CheckpointManager``, a dtype zoo incl. bf16/float16/float64/ints/bool/
  strings): the same keys, dtypes, shapes and bit-identical values as
  ``tf.train.load_checkpoint(...).get_tensor``; the object graph and the
  ``.meta`` collections as TensorFlow's own protos parse them;
* the writer's output (whole tensors, ranges in order and out of order,
  several data files): ``load_checkpoint`` and ``tf.train.Checkpoint.restore``;
* a run over TF checkpoints never imports TensorFlow;
* corrupt data, a wrong checksum, a truncated data file: one-line errors.
"""

from __future__ import annotations

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

from conftest import FIXTURES, ROOT, assert_clean_error, run_cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

_spec = importlib.util.spec_from_file_location("gen_tf", FIXTURES / "gen_tf.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


@pytest.fixture(scope="module")
def tf():
    import tensorflow  # noqa: F401  (a test extra: missing it must fail, not skip)
    from ema_cli.formats.tf_fmt import import_tf

    return import_tf()


def _zoo_values(tf, k: int) -> dict:
    rng = np.random.default_rng(k)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal(6).astype(np.float16),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "i8": np.array([-3, 4], np.int8), "i32": np.array([k, 2], np.int32), "i64": np.array(10 * k, np.int64),
        "u8": np.arange(5, dtype=np.uint8), "b": np.array([True, False, True]),
        "c64": np.array([1 + 2j], np.complex64),
        "empty": np.zeros((0, 3), np.float32),
        "big": rng.standard_normal((600, 1024)).astype(np.float32),  # > 1 MiB: the engine streams it
    }


class Zoo:
    """A ``tf.Module`` holding one variable per dtype, and string constants."""


@pytest.fixture(scope="module")
def zoo(tf, tmp_path_factory):
    """Two TF2 checkpoints (``tf.train.CheckpointManager``) of a module with every
    dtype, plus string variables (a scalar, a vector with an empty string, a
    long one), and a TF1 Saver checkpoint of the same values."""
    d = tmp_path_factory.mktemp("zoo")

    def module(k):
        m = tf.Module()
        for name, v in _zoo_values(tf, k).items():
            setattr(m, name, tf.Variable(v))
        m.s = tf.Variable(tf.constant([b"abc", b"", b"x" * 300, bytes(range(256))]))
        m.s0 = tf.Variable(tf.constant(b"hello"))
        return m

    mod = module(1)
    ckpt = tf.train.Checkpoint(root=mod)
    manager = tf.train.CheckpointManager(ckpt, str(d / "tf2"), max_to_keep=5)
    prefixes = [manager.save()]
    for name, v in _zoo_values(tf, 2).items():
        getattr(mod, name).assign(v)
    prefixes.append(manager.save())

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        vs = {}
        for name, v in _zoo_values(tf, 3).items():
            vs[name] = v1.get_variable(name, initializer=v,
                                       use_resource=True)
        vs["s"] = v1.get_variable("s", initializer=tf.constant([b"q", b""]), dtype=tf.string, use_resource=True)
        saver = v1.train.Saver()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            tf1 = saver.save(sess, str(d / "tf1" / "model.ckpt"), global_step=7)
    return {"tf2": prefixes, "tf1": tf1, "dir": d, "module": module}


@pytest.fixture(scope="module")
def keras_runs(tf, tmp_path_factory):
    """Keras 3 and tf.keras runs saved by ``CheckpointManager`` from ``fit``
    callbacks (tests/test_tf2_objgraph.py's training)."""
    from test_tf2_objgraph import train

    return {c: train(c, tmp_path_factory.mktemp(c) / "ckpts") for c in ("keras3_lso_bf16", "tf_keras")}


def all_prefixes(zoo, keras_runs, tmp_path_factory) -> list[str]:
    out = [str(p)[: -len(".index")] for fam in ("tf1", "tf2") for p in sorted((FIXTURES / fam).glob("*.index"))]
    out += [str(p) for p in zoo["tf2"]] + [zoo["tf1"]]
    for run in keras_runs.values():
        out += [str(p) for p in run["kept"]]
    return out


def _tf_name(dt) -> str:
    return {"half": "float16"}.get(dt.name, dt.name)


def test_reader_returns_what_tensorflow_returns(tf, zoo, keras_runs, tmp_path_factory):
    """Every fixture and checkpoint written here: keys, dtypes, shapes and values
    (bit for bit; strings byte for byte) equal ``tf.train.load_checkpoint``'s."""
    from ema_cli.formats import tf_bundle

    seen_dtypes = set()
    prefixes = all_prefixes(zoo, keras_runs, tmp_path_factory)
    assert len(prefixes) >= 14
    for prefix in prefixes:
        r = tf.train.load_checkpoint(prefix)
        shapes, dts = r.get_variable_to_shape_map(), r.get_variable_to_dtype_map()
        b = tf_bundle.Bundle(prefix)
        assert sorted(b.tensors) == sorted(shapes), prefix
        for name, (dt, shape) in b.tensors.items():
            assert dt == _tf_name(dts[name]), (prefix, name)
            assert list(shape) == list(shapes[name]), (prefix, name)
            got, want = b.read(name), r.get_tensor(name)
            seen_dtypes.add(dt)
            if dt == "string":
                want = np.asarray(want, dtype=object)
                assert got.shape == want.shape and got.dtype == object, (prefix, name)
                assert [bytes(x) for x in got.reshape(-1)] == [bytes(x) for x in want.reshape(-1)], (prefix, name)
            else:
                want = np.asarray(want)
                assert got.dtype == want.dtype and got.shape == want.shape, (prefix, name, got.dtype, want.dtype)
                assert got.tobytes() == want.tobytes(), (prefix, name)
        b.close()
    assert {"float32", "float64", "float16", "bfloat16", "int8", "int32", "int64", "uint8", "bool", "complex64",
            "string"} <= seen_dtypes


def test_object_graph_and_meta_parse_as_tensorflow_parses_them(tf, zoo, keras_runs, tmp_path_factory):
    """The hand-written wire-format parsers against TensorFlow's protos: the
    TrackableObjectGraph (nodes, children, attributes, slots) of every TF2
    checkpoint; its re-encoding is byte-identical, and a rename changes exactly
    the checkpoint keys; the ``.meta`` collections of the TF1 checkpoints."""
    from tensorflow.core.framework import variable_pb2
    from tensorflow.core.protobuf import meta_graph_pb2, trackable_object_graph_pb2

    from ema_cli.formats import tf_fmt, tf_objgraph

    graphs = 0
    for prefix in all_prefixes(zoo, keras_runs, tmp_path_factory):
        r = tf.train.load_checkpoint(prefix)
        if tf_fmt.OBJECT_GRAPH_KEY in r.get_variable_to_shape_map():
            raw = r.get_tensor(tf_fmt.OBJECT_GRAPH_KEY)
            want = trackable_object_graph_pb2.TrackableObjectGraph.FromString(raw)
            got = tf_objgraph.parse(raw)
            assert len(got.nodes) == len(want.nodes)
            for g, w in zip(got.nodes, want.nodes):
                assert [(c.node_id, c.local_name) for c in g.children] == \
                    [(c.node_id, c.local_name) for c in w.children]
                assert [(a.name, a.full_name, a.checkpoint_key) for a in g.attributes] == \
                    [(a.name, a.full_name, a.checkpoint_key) for a in w.attributes]
                assert [(s.original_variable_node_id, s.slot_name, s.slot_variable_node_id)
                        for s in g.slot_variables] == \
                    [(s.original_variable_node_id, s.slot_name, s.slot_variable_node_id) for s in w.slot_variables]
            keys = list(r.get_variable_to_shape_map())
            assert got.SerializeToString() == raw
            assert tf_objgraph.rename_keys(raw, {}, keys) == raw
            mapping = {k: "renamed/" + k for k in keys}
            renamed = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
                tf_objgraph.rename_keys(raw, mapping, mapping.values()))
            for w in want.nodes:
                for a in w.attributes:
                    a.checkpoint_key = mapping[a.checkpoint_key]
            assert renamed == want
            graphs += 1
        meta = prefix + ".meta"
        if os.path.exists(meta):
            mg = meta_graph_pb2.MetaGraphDef.FromString(Path(meta).read_bytes())
            want = {}
            for key in ("trainable_variables", "moving_average_variables"):
                if key in mg.collection_def:
                    names = []
                    for bts in mg.collection_def[key].bytes_list.value:
                        v = variable_pb2.VariableDef.FromString(bts)
                        names.append(v.save_slice_info_def.full_name or v.variable_name.rsplit(":", 1)[0])
                    want[key] = list(dict.fromkeys(names))
            assert tf_fmt.read_meta_collections(meta) == want, meta
            assert want.get("trainable_variables")
    assert graphs >= 7


def test_writer_output_loads_and_restores_in_tensorflow(tf, zoo, tmp_path):
    """The CLI's TF output of the dtype zoo (a streamed 2.3 MiB tensor, every
    dtype, strings): TensorFlow reads floats as the float64 mean rounded once
    and the rest as the newest checkpoint's values; ``tf.train.Checkpoint``
    restores it into a fresh module with every value matched; and once split
    into one data file per tensor."""
    for env, n_data in ((None, 1), ({"EMA_AVG_TF_BATCH_BYTES": "1"}, None)):
        out = tmp_path / f"out-{n_data}" / "avg.ckpt"
        out.parent.mkdir()
        res = run_cli(*zoo["tf2"], "-o", out, "--quiet", env=env)
        assert res.code == 0, res
        datas = sorted(p.name for p in out.parent.glob("avg.ckpt.data-*"))
        r = tf.train.load_checkpoint(str(out))
        a, b = tf.train.load_checkpoint(zoo["tf2"][0]), tf.train.load_checkpoint(zoo["tf2"][1])
        assert len(datas) == (n_data or len(r.get_variable_to_shape_map()))
        assert r.get_variable_to_dtype_map() == b.get_variable_to_dtype_map()
        for name in b.get_variable_to_shape_map():
            got, newest = r.get_tensor(name), b.get_tensor(name)
            dt = _tf_name(b.get_variable_to_dtype_map()[name])
            if dt in ("float32", "float64", "float16", "bfloat16") and "save_counter" not in name:
                want = ((np.asarray(a.get_tensor(name), np.float64) + np.asarray(newest, np.float64)) / 2)
                want = want.astype(np.asarray(newest).dtype) if dt != "bfloat16" else want
                if dt == "bfloat16":
                    assert np.abs(np.asarray(got, np.float64) - want).max() <= np.abs(want).max() * 2 ** -8, name
                else:
                    assert np.asarray(got).tobytes() == want.tobytes(), name
            elif dt == "string":
                assert np.asarray(got, object).tolist() == np.asarray(newest, object).tolist(), name
            else:
                assert np.asarray(got).tobytes() == np.asarray(newest).tobytes(), name
        fresh = zoo["module"](5)
        tf.train.Checkpoint(root=fresh).restore(str(out)).assert_consumed()
        assert fresh.s.numpy().tolist() == [b"abc", b"", b"x" * 300, bytes(range(256))]
        assert int(fresh.i64.numpy()) == 20


def test_bundle_writer_ranges_in_any_order(tf, tmp_path):
    """BundleWriter directly: ranges in order, out of order, from several
    threads, over two data files; TensorFlow reads exactly the values."""
    from concurrent.futures import ThreadPoolExecutor

    from ema_cli.formats import tf_bundle

    rng = np.random.default_rng(0)
    vals = {f"t{i}": rng.standard_normal(1000 + i).astype(np.float32) for i in range(6)}
    vals["s"] = np.array([b"a", b"bc"], object)
    names = sorted(vals)
    shards = [[(n, "float32" if n != "s" else "string", vals[n].shape) for n in names[:3]],
              [(n, "float32" if n != "s" else "string", vals[n].shape) for n in names[3:]]]
    w = tf_bundle.BundleWriter(str(tmp_path / "m"), shards, "m")
    w.reserve()

    def put(name):
        v = vals[name]
        if name == "s":
            w.write(name, v)
        elif name == "t1":  # out of order: its checksum comes from the file
            w.write_range(name, 500, v[500:].copy())
            w.write_range(name, 0, v[:500].copy())
        else:
            for start in range(0, v.size, 300):
                w.write_range(name, start, v[start:start + 300].copy())

    with ThreadPoolExecutor(3) as ex:
        list(ex.map(put, names))
    w.close()
    r = tf.train.load_checkpoint(str(tmp_path / "m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data-00000-of-00002", "m.data-00001-of-00002",
                                                          "m.index"]
    for n in names:
        got = r.get_tensor(n)
        assert (list(got) == list(vals[n])) if n == "s" else got.tobytes() == vals[n].tobytes(), n


NO_TF_CHILD = """
import atexit, runpy, sys
atexit.register(lambda: print("TENSORFLOW-IMPORTED" if "tensorflow" in sys.modules else "NO-TENSORFLOW"))
sys.argv = ["ema-avg", *sys.argv[1:]]
runpy.run_module("ema_cli", run_name="__main__")
"""


def test_averaging_tf_checkpoints_never_imports_tensorflow(tmp_path):
    """The real CLI (``python -m ema_cli`` through runpy) over the TF1 fixtures
    (.meta collections, a partitioned variable) and the TF2 fixtures (object
    graph), to safetensors and to TF, with ``--verify``: ``tensorflow`` is never
    in ``sys.modules`` (an atexit hook reports it after the run)."""
    for family in ("tf1", "tf2"):
        for out in (tmp_path / f"{family}.safetensors", tmp_path / family / "m.ckpt"):
            out.parent.mkdir(exist_ok=True)
            proc = subprocess.run([sys.executable, "-c", NO_TF_CHILD, str(FIXTURES / family), "-o", str(out),
                                   "--verify", "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                                  env=dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(ROOT))))
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.splitlines()[-1] == "NO-TENSORFLOW", (family, out, proc.stdout)
            assert out.exists() or Path(str(out) + ".index").exists()


def _entry_of(prefix: Path, key: bytes):
    from ema_cli.formats import tf_bundle

    table = tf_bundle.read_table(Path(str(prefix) + ".index").read_bytes())
    return tf_bundle.decode_entry(dict(table)[key])


@pytest.mark.parametrize("damage", ["flip-data", "wrong-crc", "truncate-data", "flip-string"])
def test_corrupt_data_gives_one_line_naming_file_and_tensor(tmp_path, damage):
    """A flipped data byte, an index entry whose crc32c is wrong (the table's own
    checksums right), a truncated data file, a damaged string tensor: one
    ``error:`` line naming the data file (or index) and the tensor."""
    from ema_cli.formats import tf_bundle

    d = tmp_path / "run"
    shutil.copytree(FIXTURES / "tf2", d)
    prefix = d / "ckpt-2"
    data = Path(str(prefix) + ".data-00000-of-00001")
    key = "w/.ATTRIBUTES/VARIABLE_VALUE" if damage != "flip-string" else "_CHECKPOINTABLE_OBJECT_GRAPH"
    e = _entry_of(prefix, key.encode())
    raw = bytearray(data.read_bytes())
    if damage in ("flip-data", "flip-string"):
        raw[e.offset + e.size - 1] ^= 0x40
        data.write_bytes(bytes(raw))
        want = f"error: {data}: tensor '{key}': truncated or corrupt data: checksum mismatch"
    elif damage == "truncate-data":  # the last tensor of the file loses its last byte
        table = tf_bundle.read_table(Path(str(prefix) + ".index").read_bytes())
        key, e = max(((k.decode(), tf_bundle.decode_entry(v)) for k, v in table if k), key=lambda t: t[1].offset)
        data.write_bytes(bytes(raw[: e.offset + e.size - 1]))
        want = f"error: {data}: tensor '{key}': truncated or corrupt data: its bytes"
    else:
        index = Path(str(prefix) + ".index")
        table = tf_bundle.read_table(index.read_bytes())
        table = [(k, tf_bundle.encode_entry(e.dtype, e.shape, e.shard_id, e.offset, e.size, e.crc32c ^ 1)
                  if k == key.encode() else v) for k, v in table]
        index.write_bytes(tf_bundle.write_table(table))
        want = f"error: {data}: tensor '{key}': truncated or corrupt data: checksum mismatch"
    res = run_cli(d, "-o", tmp_path / "avg.safetensors", "--allow-copy-only")
    line = assert_clean_error(res, code=1)
    assert line.startswith(want), line
    assert not (tmp_path / "avg.safetensors").exists()


def test_corrupt_index_block_is_refused(tmp_path):
    """A flipped byte inside the index's data block: its block checksum fails."""
    d = tmp_path / "run"
    shutil.copytree(FIXTURES / "tf1", d)
    index = d / "model.ckpt-3.index"
    raw = bytearray(index.read_bytes())
    raw[20] ^= 0x01
    index.write_bytes(bytes(raw))
    line = assert_clean_error(run_cli(d, "-o", tmp_path / "avg.safetensors"), code=1)
    assert line.startswith(f"error: {index}: not a readable TensorFlow checkpoint index: block checksum mismatch")


def test_inspect_lists_what_tensorflow_lists_without_tensorflow(tmp_path):
    """``inspect --json`` of a TF1 checkpoint: every key, with TensorFlow unimportable."""
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "from ema_cli.cli import main\n"
            "main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", code, "inspect", str(FIXTURES / "tf1" / "model.ckpt-5"), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    doc = doc[0] if isinstance(doc, list) else doc
    assert "part" in json.dumps(doc) and "dense/kernel" in json.dumps(doc)


# --------------------------------------------------------------------------- fuzzed, in this process
#
# The reader is pure Python now, so mutated bundles are fuzzed here, directly
# (test_fuzz.py's TF targets run the whole CLI on them in a worker process and
# compare every success with TensorFlow's reading).

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fuzz import FUZZ, mutate_bytes  # noqa: E402


@FUZZ
@given(st.data())
def test_bundle_reader_fuzzed(tmp_path_factory, data):
    """Raw byte mutations of a fixture's ``.index`` or data file: opening it and
    reading every tensor either works or raises EmaError (no other exception)."""
    from ema_cli.errors import EmaError
    from ema_cli.formats import tf_bundle

    family = data.draw(st.sampled_from(["tf1", "tf2"]), label="family")
    name = {"tf1": "model.ckpt-3", "tf2": "ckpt-2"}[family]
    case = tmp_path_factory.mktemp("bundle-fuzz")
    for f in (FIXTURES / family).glob(name + ".*"):
        shutil.copyfile(f, case / f.name)
    target = case / (name + data.draw(st.sampled_from([".index", ".data-00000-of-00001"]), label="file"))
    buf = bytearray(target.read_bytes())
    log: list[str] = []
    mutate_bytes(data, buf, [0, max(0, len(buf) - 48), max(0, len(buf) - 53)], log)
    target.write_bytes(bytes(buf))
    try:
        b = tf_bundle.Bundle(str(case / name))
        for t in b.tensors:
            b.read(t)
        b.close()
    except EmaError:
        pass


@pytest.fixture(scope="module")
def big_tf_run(tf, tmp_path_factory):
    """Three checkpoints of a model with tensors large enough to be streamed
    (4 MiB float32 and 2 MiB bfloat16), written by ``tf.train.CheckpointManager``
    (an object graph with a step counter) as the variables change."""
    d = tmp_path_factory.mktemp("big-tf")
    w = tf.Variable(tf.random.stateless_normal((1024, 1024), seed=(1, 2)), name="w")
    h = tf.Variable(tf.cast(tf.random.stateless_normal((1024, 1024), seed=(3, 4)), tf.bfloat16), name="h")
    ckpt = tf.train.Checkpoint(w=w, h=h, step=tf.Variable(0, dtype=tf.int64))
    mgr = tf.train.CheckpointManager(ckpt, str(d), max_to_keep=None)
    for k in range(3):
        w.assign_add(tf.random.stateless_normal((1024, 1024), seed=(5, k)) * 0.01)
        h.assign_add(tf.cast(tf.random.stateless_normal((1024, 1024), seed=(6, k)) * 0.01, tf.bfloat16))
        ckpt.step.assign(100 * (k + 1))
        mgr.save(checkpoint_number=100 * (k + 1))
    return d, list(mgr.checkpoints)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("out", ["avg.safetensors", "out/avg.ckpt"])
def test_streamed_tensor_checksum_is_checked_during_the_sum(tf, big_tf_run, tmp_path, where, out):
    """Large TF tensors are streamed through the kernel with their crc32c
    computed just ahead of the reads (no pass of its own): the clean run equals
    the float64 mean of what ``tf.train.load_checkpoint`` reads, and a flipped
    byte anywhere in a streamed tensor (its first, a middle or its last byte)
    is the one-line checksum error naming the data file and the tensor, with
    nothing written."""
    src, prefixes = big_tf_run
    d = tmp_path / "run"
    shutil.copytree(src, d)
    key = "w/.ATTRIBUTES/VARIABLE_VALUE"
    (tmp_path / "out").mkdir()
    res = run_cli(d, "-o", tmp_path / out, "--force")
    assert res.code == 0, res.err
    if out.endswith(".safetensors"):
        from safetensors.numpy import load_file

        got = load_file(str(tmp_path / out))["w/.ATTRIBUTES/VARIABLE_VALUE"]
    else:
        got = tf.train.load_checkpoint(str(tmp_path / out)).get_tensor(key)
    vals = [tf.train.load_checkpoint(p).get_tensor(key).astype(np.float64) for p in prefixes]
    assert np.array_equal(got, ((vals[0] + vals[1] + vals[2]) / 3).astype(np.float32))

    prefix = Path(prefixes[1].replace(str(src), str(d)))
    data = Path(str(prefix) + ".data-00000-of-00001")
    e = _entry_of(prefix, key.encode())
    pos = {"first": 0, "middle": e.size // 2 + 12345, "last": e.size - 1}[where]
    raw = bytearray(data.read_bytes())
    raw[e.offset + pos] ^= 0x01
    data.write_bytes(bytes(raw))
    target = tmp_path / ("again.safetensors" if out.endswith(".safetensors") else "out2/avg.ckpt")
    target.parent.mkdir(exist_ok=True)
    res = run_cli(d, "-o", target)
    line = assert_clean_error(res, code=1)
    assert line.startswith(f"error: {data}: tensor '{key}': truncated or corrupt data: checksum mismatch"), line
    assert not list(target.parent.glob(target.name + "*")), list(target.parent.iterdir())
