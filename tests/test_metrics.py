"""--metrics where training tools write them: HF trainer_state.json, TensorBoard
event files (TF2 tensors and TF1 simple_value), Keras CSVLogger; --metric; the
metric per checkpoint in plan; the selection in the recipe; clean errors."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from conftest import assert_clean_error, load_st, run_cli, save_st

STEPS = [100, 200, 300, 400, 500, 600]
EVAL_LOSS = {100: 0.90, 200: 0.55, 300: 0.61, 400: 0.42, 500: 0.58, 600: 0.47}  # best two: 400, 600
EVAL_ACC = {100: 0.50, 200: 0.71, 300: 0.69, 400: 0.80, 500: 0.83, 600: 0.78}  # best two: 400, 500


def _weights(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"dense.weight": rng.standard_normal((4, 3)).astype(np.float32),
            "dense.bias": rng.standard_normal(3).astype(np.float32)}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """An HF-Trainer-shaped run: checkpoint-N/model.safetensors and, in each, the
    trainer_state.json the real TrainerState writes, with the history up to N."""
    from transformers import TrainerState

    run = tmp_path_factory.mktemp("hf") / "out"
    history = []
    for n in STEPS:
        history.append({"loss": 1.0 / n, "grad_norm": 0.1, "learning_rate": 1e-4, "epoch": n / 200, "step": n})
        history.append({"eval_loss": EVAL_LOSS[n], "eval_accuracy": EVAL_ACC[n], "eval_runtime": 0.5,
                        "epoch": n / 200, "step": n})
        ck = run / f"checkpoint-{n}"
        ck.mkdir(parents=True)
        save_st(ck / "model.safetensors", _weights(n), metadata={"format": "pt"})
        TrainerState(log_history=list(history), global_step=n, max_steps=STEPS[-1]).save_to_json(str(ck / "trainer_state.json"))
    only_loss = run.parent / "eval_loss_only.json"
    TrainerState(log_history=[{"eval_loss": EVAL_LOSS[n], "epoch": n / 200, "step": n} for n in STEPS],
                 global_step=STEPS[-1]).save_to_json(str(only_loss))
    return run, only_loss


def _mean_of(steps) -> dict[str, np.ndarray]:
    ws = [_weights(s) for s in steps]
    return {k: (sum(w[k].astype(np.float64) for w in ws) / len(ws)).astype(np.float32) for k in ws[0]}


def _selected(doc) -> list[int]:
    return [c["step"] for c in doc["checkpoints"] if c["selected"]]


def test_trainer_state_top_k_selects_and_averages(hf_run, tmp_path):
    run, _ = hf_run
    state = run / "checkpoint-600" / "trainer_state.json"
    out = tmp_path / "avg.safetensors"
    res = run_cli("average", run, "-o", out, "--metrics", state, "--metric", "eval_loss", "--top-k", "2",
                  "--minimize", "--json")
    assert res.code == 0, res
    doc = res.json()
    assert _selected(doc) == [400, 600]
    assert [c["metric"] for c in doc["checkpoints"]] == [EVAL_LOSS[s] for s in STEPS]
    tensors, meta = load_st(out)
    for k, v in _mean_of([400, 600]).items():
        np.testing.assert_array_equal(tensors[k], v)
    recipe = json.loads(meta["ema_avg"])
    assert recipe["selection"] == {"top_k": 2, "metric": "eval_loss", "metrics": str(state), "direction": "minimize"}
    assert recipe["dtype"] == "keep"
    assert [c["metric"] for c in recipe["checkpoints"]] == [EVAL_LOSS[s] for s in STEPS]
    # maximize another key of the same history
    res = run_cli("plan", run, "--metrics", state, "--metric", "eval_accuracy", "--top-k", "2", "--maximize", "--json")
    assert res.code == 0, res
    assert _selected(res.json()) == [400, 500]


def test_trainer_state_from_run_or_checkpoint_directory(hf_run):
    run, _ = hf_run
    for where, steps in ((run, STEPS), (run / "checkpoint-600", STEPS), (run / "checkpoint-300", STEPS[:3])):
        # the run directory: the newest checkpoint's state holds the whole history
        res = run_cli("plan", *[run / f"checkpoint-{s}" for s in steps], "--metrics", where, "--metric", "eval_loss",
                      "--top-k", "2", "--minimize", "--json")
        assert res.code == 0, (where, res)
        assert _selected(res.json()) == sorted(sorted(steps, key=EVAL_LOSS.get)[:2]), where
    # checkpoint-300's state does not know step 400: a clean error naming the checkpoint
    res = run_cli("plan", run, "--metrics", run / "checkpoint-300", "--metric", "eval_loss", "--top-k", "2",
                  "--minimize")
    assert_clean_error(res, "checkpoint-400", "no metric 'eval_loss'", "step 400")


def test_windows_then_top_k_and_recipe_records_windows(hf_run, tmp_path):
    run, only_loss = hf_run
    res = run_cli("plan", run, "--metrics", only_loss, "--top-k", "1", "--minimize", "--start-step", "450", "--json")
    assert res.code == 0, res
    doc = res.json()
    assert _selected(doc) == [600]  # one metric in the file: --metric is not needed
    assert doc["params"]["selection"] == {"start_step": 450, "top_k": 1, "metric": "eval_loss",
                                          "metrics": str(only_loss), "direction": "minimize"}
    # the table shows the metric column (stdout, the primary output: plain text off a terminal)
    res = run_cli("plan", run, "--metrics", only_loss, "--top-k", "1", "--minimize")
    assert res.code == 0, res
    assert "eval_loss" in res.out and "0.42" in res.out and "top 1 by eval_loss (minimize)" in res.out


def test_ambiguous_metric_lists_the_candidates(hf_run):
    run, _ = hf_run
    state = run / "checkpoint-600" / "trainer_state.json"
    line = assert_clean_error(run_cli("plan", run, "--metrics", state, "--top-k", "2", "--minimize"),
                              "--metric", "eval_loss", "eval_accuracy", str(state), code=2)
    candidates = line.split("--metric: ")[1].split(", ")
    assert "step" not in candidates and "epoch" not in candidates  # the index is not a metric
    assert_clean_error(run_cli("plan", run, "--metrics", state, "--metric", "eval_bleu", "--top-k", "2", "--minimize"),
                       "no metric 'eval_bleu'", "eval_loss", "eval_accuracy")
    assert_clean_error(run_cli("plan", run, "--metric", "eval_loss"), "--metrics and --top-k", code=2)


# --------------------------------------------------------------------------- TensorBoard


@pytest.fixture(scope="module")
def tb_logs(tmp_path_factory):
    """tf.summary event files: TF2 tensors, a restarted run that rewrites two
    steps, and a TF1 FileWriter with simple_value."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("tb")
    logs = root / "logs"
    w = tf.summary.create_file_writer(str(logs))
    with w.as_default():
        for s in STEPS:
            tf.summary.scalar("eval_loss", 5.0 if s == 200 else EVAL_LOSS[s], step=s)  # 200 rewritten below
            tf.summary.scalar("eval_accuracy", EVAL_ACC[s], step=s)
    w.close()
    first = sorted(logs.glob("events.out.tfevents.*"))
    assert len(first) == 1
    single = root / "single"
    single.mkdir()
    shutil.copy(first[0], single / first[0].name)
    # a restart that logs step 200 again (later wall time, new file): the last written value wins
    import time

    time.sleep(1.1)  # event file names carry the second
    w = tf.summary.create_file_writer(str(logs))
    with w.as_default():
        tf.summary.scalar("eval_loss", EVAL_LOSS[200], step=200)
    w.close()
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2
    # TF1: Summary protos with simple_value
    tf1 = root / "tf1" / "eval"
    with tf.Graph().as_default():
        fw = tf.compat.v1.summary.FileWriter(str(tf1))
        for s in STEPS:
            fw.add_summary(tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(tag="loss", simple_value=EVAL_LOSS[s])]),
                           global_step=s)
        fw.close()
    return {"dir": logs, "file": next((single).iterdir()), "tf1": root / "tf1"}


@pytest.fixture(scope="module")
def st_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    for s in STEPS:
        save_st(d / f"ckpt-{s}.safetensors", _weights(s))
    return d


def test_tensorboard_file_and_directory(tb_logs, st_run, tmp_path):
    # the single file: tf.summary tensors; step 200 holds 5.0 there
    res = run_cli("plan", st_run, "--metrics", tb_logs["file"], "--metric", "eval_loss", "--top-k", "2",
                  "--minimize", "--json")
    assert res.code == 0, res
    doc = res.json()
    assert _selected(doc) == [400, 600]
    got = [c["metric"] for c in doc["checkpoints"]]
    want = [5.0 if s == 200 else EVAL_LOSS[s] for s in STEPS]
    np.testing.assert_allclose(got, want, rtol=1e-6)  # tf.summary stores float32
    # the directory: two files, the restart rewrote step 200 to 0.55 (last written wins)
    out = tmp_path / "avg.safetensors"
    res = run_cli("average", st_run, "-o", out, "--metrics", tb_logs["dir"], "--metric", "eval_loss", "--top-k", "3",
                  "--minimize", "--json")
    assert res.code == 0, res
    doc = res.json()
    assert _selected(doc) == [200, 400, 600]
    np.testing.assert_allclose([c["metric"] for c in doc["checkpoints"]], [EVAL_LOSS[s] for s in STEPS], rtol=1e-6)
    tensors, meta = load_st(out)
    for k, v in _mean_of([200, 400, 600]).items():
        np.testing.assert_array_equal(tensors[k], v)
    assert json.loads(meta["ema_avg"])["selection"]["metric"] == "eval_loss"
    # two tags: --metric is required
    assert_clean_error(run_cli("plan", st_run, "--metrics", tb_logs["dir"], "--top-k", "2", "--maximize"),
                       "eval_accuracy", "eval_loss", "--metric", code=2)


def test_tensorboard_tf1_simple_value_in_a_run_subdirectory(tb_logs, st_run):
    res = run_cli("plan", st_run, "--metrics", tb_logs["tf1"], "--top-k", "2", "--minimize", "--json")
    assert res.code == 0, res
    doc = res.json()
    assert _selected(doc) == [400, 600] and doc["params"]["selection"]["metric"] == "loss"
    np.testing.assert_allclose([c["metric"] for c in doc["checkpoints"]], [EVAL_LOSS[s] for s in STEPS], rtol=1e-6)


def test_tensorboard_several_runs_qualify_the_tag(tb_logs, st_run, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(tb_logs["tf1"] / "eval", root / "a")
    shutil.copytree(tb_logs["tf1"] / "eval", root / "b")
    assert_clean_error(run_cli("plan", st_run, "--metrics", root, "--metric", "loss", "--top-k", "2", "--minimize"),
                       "a/loss", "b/loss", code=2)
    res = run_cli("plan", st_run, "--metrics", root, "--metric", "b/loss", "--top-k", "2", "--minimize", "--json")
    assert res.code == 0, res
    assert _selected(res.json()) == [400, 600]


def test_unreadable_metrics_are_one_line_errors(tb_logs, st_run, tmp_path):
    def plan(path, *extra):
        return run_cli("plan", st_run, "--metrics", path, "--top-k", "2", "--minimize", *extra)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)
    assert_clean_error(plan(garbage), str(garbage), "not a metrics file")
    data = tb_logs["file"].read_bytes()
    cut = tmp_path / tb_logs["file"].name
    cut.write_bytes(data[:-7])
    assert_clean_error(plan(cut, "--metric", "eval_loss"), str(cut), "truncated")
    flipped = tmp_path / "flipped" / tb_logs["file"].name
    flipped.parent.mkdir()
    flipped.write_bytes(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])
    assert_clean_error(plan(flipped, "--metric", "eval_loss"), str(flipped), "corrupt")
    assert_clean_error(plan(tb_logs["dir"], "--metric", "val_loss"), str(tb_logs["dir"]), "no metric 'val_loss'",
                       "eval_loss")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_clean_error(plan(empty), str(empty), "empty")
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("step,pr\xe9cision\n100,0.5\n".encode("latin-1"))
    assert_clean_error(plan(latin), str(latin), "not a metrics file")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"log_history": [')
    assert_clean_error(plan(bad_json), str(bad_json), "JSON")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert_clean_error(plan(nothing), str(nothing), "trainer_state.json", "tfevents")
    assert_clean_error(plan(tmp_path / "missing.csv"), "missing.csv", "cannot read")


def test_missing_tensorboard_gives_the_install_hint(tb_logs, st_run, tmp_path):
    """With the tensorboard package not importable (a shadowing package that
    raises ImportError), reading event files says how to install it."""
    shim = tmp_path / "shim" / "tensorboard"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}
    res = run_cli("plan", st_run, "--metrics", tb_logs["file"], "--top-k", "2", "--minimize", env=env)
    assert_clean_error(res, "pip install 'ema-avg[tensorboard]'", str(tb_logs["file"]))


# --------------------------------------------------------------------------- CSV


def test_plain_csv_needs_metric_when_several_columns(st_run, tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("step,val_loss,val_acc,note\n" + "".join(f"{s},{EVAL_LOSS[s]},{EVAL_ACC[s]},run a\n" for s in STEPS))
    assert_clean_error(run_cli("plan", st_run, "--metrics", m, "--top-k", "2", "--minimize"),
                       "val_loss", "val_acc", code=2)
    res = run_cli("plan", st_run, "--metrics", m, "--metric", "val_acc", "--top-k", "2", "--maximize", "--json")
    assert res.code == 0, res
    assert _selected(res.json()) == [400, 500]
    assert_clean_error(run_cli("plan", st_run, "--metrics", m, "--metric", "note", "--top-k", "2", "--maximize"),
                       "'note' is not numeric", "row 2")
    res = run_cli("plan", st_run, "--metrics", m, "--metric", "val_acc", "--top-k", "3", "--maximize", "--last-n", "2",
                  "--json")
    assert res.code == 0 and _selected(res.json()) == [500, 600], res
    assert "warning: --top-k 3 but only 2 checkpoint(s)" in res.err
    # a step column anywhere is the key; a header-less two-column CSV has one candidate
    m.write_text("val_loss,step\n" + "".join(f"{EVAL_LOSS[s]},{s}\n" for s in STEPS))
    res = run_cli("plan", st_run, "--metrics", m, "--top-k", "2", "--minimize", "--json")
    assert res.code == 0, res
    assert _selected(res.json()) == [400, 600]
    m.write_text("".join(f"{s},{EVAL_LOSS[s]}\n" for s in STEPS))
    res = run_cli("plan", st_run, "--metrics", m, "--top-k", "2", "--minimize", "--json")
    assert res.code == 0, res
    assert _selected(res.json()) == [400, 600]


@pytest.mark.slow
def test_keras_csvlogger_maps_epochs_to_model_checkpoint(tmp_path):
    """CSVLogger writes 0-based epochs; ModelCheckpoint's {epoch} is 1-based.
    The checkpoint names carry Keras' own {val_loss}: the oracle for the mapping."""
    import keras

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    ck = tmp_path / "ckpts"
    ck.mkdir()
    log = tmp_path / "log.csv"
    model.fit(x, y, validation_data=(x[:16], y[:16]), epochs=6, batch_size=16, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.CSVLogger(str(log)),
                         keras.callbacks.ModelCheckpoint(str(ck / "w.{epoch:02d}-{val_loss:.4f}.weights.h5"),
                                                         save_weights_only=True)])
    files = sorted(ck.iterdir())
    assert len(files) == 6 and log.read_text().startswith("epoch,")
    out = tmp_path / "avg.safetensors"
    res = run_cli("average", ck, "-o", out, "--metrics", log, "--metric", "val_loss", "--top-k", "2", "--minimize",
                  "--json")
    assert res.code == 0, res
    doc = res.json()
    # each checkpoint's metric is the val_loss Keras put in its name
    for c in doc["checkpoints"]:
        named = float(re.search(r"-(\d+\.\d+)\.weights\.h5$", c["path"]).group(1))
        assert abs(c["metric"] - named) <= 5e-5, c
    by_loss = sorted(doc["checkpoints"], key=lambda c: c["metric"])[:2]
    assert sorted(c["path"] for c in doc["checkpoints"] if c["selected"]) == sorted(c["path"] for c in by_loss)
    # the output is the mean of what Keras reads back from the two selected files
    arrays = []
    for c in by_loss:
        model.load_weights(c["path"])
        arrays.append([w.astype(np.float64) for w in model.get_weights()])
    tensors, _ = load_st(out)
    np.testing.assert_array_equal(tensors["layers/dense/vars/0"], ((arrays[0][0] + arrays[1][0]) / 2).astype(np.float32))
    np.testing.assert_array_equal(tensors["layers/dense/vars/1"], ((arrays[0][1] + arrays[1][1]) / 2).astype(np.float32))
    # without --metric: loss and val_loss are candidates
    assert_clean_error(run_cli("plan", ck, "--metrics", log, "--top-k", "2", "--minimize"), "loss, val_loss", code=2)
