"""Training-loop integrations (issue 14), with the real frameworks: the Keras
callback after a real ``model.fit`` + ``ModelCheckpoint``, the transformers
``TrainerCallback`` after a real (tiny, CPU) ``Trainer`` run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest


# --------------------------------------------------------------------------- Keras


def _keras_model(keras, compile=True):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu", name="dense"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2, name="head")])
    if compile:
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def _weights_of(keras, path):
    m = _keras_model(keras, compile=False)
    m.load_weights(path)
    return [np.array(w) for w in m.get_weights()]


@pytest.mark.slow
def test_keras_callback_averages_model_checkpoint_files(tmp_path):
    keras = pytest.importorskip("keras")
    from ema_cli.keras import AverageCheckpoints

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 4)).astype(np.float32), rng.standard_normal((64, 2)).astype(np.float32)
    ck = tmp_path / "ckpts"
    ck.mkdir()
    model = _keras_model(keras)
    saver = keras.callbacks.ModelCheckpoint(str(ck / "ep{epoch:02d}.weights.h5"), save_weights_only=True)
    mean_cb = AverageCheckpoints(ck, ck / "avg.weights.h5", every_n_epochs=2)  # inside the watched directory
    ema_cb = AverageCheckpoints(ck, tmp_path / "ema.weights.h5", decay=0.5)
    seen = []

    class Spy(keras.callbacks.Callback):  # what the every-2-epochs update had averaged by then
        def on_epoch_end(self, epoch, logs=None):
            if mean_cb.result is not None:
                seen.append((epoch, len(mean_cb.result.checkpoints)))

    model.fit(x, y, epochs=5, batch_size=16, verbose=0, callbacks=[saver, mean_cb, ema_cb, Spy()])
    files = sorted(ck.glob("ep*.weights.h5"))
    assert [f.name for f in files] == [f"ep{e:02d}.weights.h5" for e in range(1, 6)]
    assert seen[0] == (1, 2) and (3, 4) in seen  # after epochs 2 and 4 (the output itself never an input)
    assert [c.step for c in mean_cb.result.checkpoints] == [4, 8, 12, 16, 20]  # optimizer iterations

    per_file = [_weights_of(keras, f) for f in files]
    got = _weights_of(keras, ck / "avg.weights.h5")
    for i, w in enumerate(got):
        ref = sum(p[i].astype(np.float64) for p in per_file) / len(per_file)
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, ref.astype(np.float32))
    d = 0.5
    ema_w = [d ** 4] + [(1 - d) * d ** (4 - k) for k in range(1, 5)]
    got = _weights_of(keras, tmp_path / "ema.weights.h5")
    for i, w in enumerate(got):
        ref = sum(wk * p[i].astype(np.float64) for wk, p in zip(ema_w, per_file))
        np.testing.assert_allclose(w, ref.astype(np.float32), rtol=0, atol=0)
    assert ema_cb.result.mode == "ema" and ema_cb.result.weights == pytest.approx(ema_w, abs=0)


def test_keras_callback_without_checkpoints_warns(tmp_path):
    pytest.importorskip("keras")
    import ema_cli
    from ema_cli.keras import AverageCheckpoints

    cb = AverageCheckpoints(tmp_path / "none", tmp_path / "a.weights.h5")
    with pytest.warns(ema_cli.EmaWarning, match="no checkpoints"):
        cb.on_train_end()
    assert cb.result is None and not (tmp_path / "a.weights.h5").exists()
    with pytest.raises(ema_cli.EmaError):
        AverageCheckpoints(tmp_path, tmp_path / "a.h5", every_n_epochs=0)


# --------------------------------------------------------------------------- transformers


@pytest.mark.slow
def test_hf_trainer_callback_writes_a_loadable_average(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from ema_cli.hf import AverageCheckpointsCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.tensor(i % 2)} for i in range(32)]
    out = tmp_path / "run"
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=8, save_strategy="steps", save_steps=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True,
        seed=0)
    cb = AverageCheckpointsCallback(decay=None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()

    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    avg_dir = out / "averaged"
    assert (avg_dir / "model.safetensors").is_file() and (avg_dir / "config.json").is_file()
    assert [c.step for c in cb.result.checkpoints] == [2, 4, 6, 8]

    loaded = transformers.BertForSequenceClassification.from_pretrained(avg_dir)
    states = [load_file(str(p / "model.safetensors")) for p in ckpts]
    got = loaded.state_dict()
    checked = 0
    for name, t in states[-1].items():
        if not t.is_floating_point():
            assert torch.equal(got[name], t), name
            continue
        ref = sum(s[name].double() for s in states) / len(states)
        assert torch.equal(got[name], ref.float()), name
        checked += 1
    assert checked >= 20
    # the raw file equals the mean too, and records the recipe
    with open(avg_dir / ".ema-avg.json") as fh:
        assert "model.safetensors" in json.load(fh)["files"]
    assert os.path.getsize(avg_dir / "model.safetensors") > 0
