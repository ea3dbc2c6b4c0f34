"""Directories as users have them (an HF Trainer ``output_dir``), and output
directories that load with ``from_pretrained``.

The run is written by the real ``transformers`` library: a tiny GPT-2 built
from a config in code and a WordLevel tokenizer built offline, trained for 6
steps by ``transformers.Trainer`` (checkpoints every 2 steps), then
``trainer.save_model(out)``.  Without ``accelerate`` (which the Trainer needs)
the same layout is written by a plain torch loop with the library's own
writers (``save_pretrained``, ``TrainerState.save_to_json``, ``torch.save`` of
the optimizer, scheduler and RNG states).  Oracles: tensors read back by the
``safetensors`` library from each checkpoint (float64 mean), and
``GPT2LMHeadModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` on
the output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, assert_clean_error, load_st, run_cli, save_st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HF_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
STEPS = (2, 4, 6)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(98)} | {"[UNK]": 98, "[PAD]": 99}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                     bos_token_id=0, eos_token_id=0, pad_token_id=99)
    return GPT2LMHeadModel(cfg)


def _data():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 98, (16, 16), generator=g)


def _train_with_trainer(out: Path) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    x = _data()

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"input_ids": x[i], "labels": x[i]}

    args = TrainingArguments(output_dir=str(out), save_steps=2, max_steps=6, report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, seed=0, learning_rate=1e-2,
                             save_total_limit=None, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=_model(), args=args, train_dataset=DS(), processing_class=_tokenizer())
    trainer.train()
    trainer.save_model(str(out))


def _train_by_hand(out: Path) -> None:
    """The Trainer's layout, written by the library's own writers (no accelerate)."""
    import torch
    from transformers import TrainerState

    model, tok, x = _model(), _tokenizer(), _data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 6)
    state = TrainerState(max_steps=6, save_steps=2)
    for step in range(1, 7):
        batch = x[(step - 1) % 4 * 4:(step - 1) % 4 * 4 + 4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        state.global_step = step
        state.log_history.append({"loss": loss.item(), "step": step})
        if step % 2 == 0:
            d = out / f"checkpoint-{step}"
            model.save_pretrained(d)
            tok.save_pretrained(d)
            torch.save(opt.state_dict(), d / "optimizer.pt")
            torch.save(sched.state_dict(), d / "scheduler.pt")
            torch.save({"cpu": torch.get_rng_state()}, d / "rng_state.pth")
            torch.save({"output_dir": str(out), "save_steps": 2}, d / "training_args.bin")
            state.save_to_json(str(d / "trainer_state.json"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    torch.save({"output_dir": str(out)}, out / "training_args.bin")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """``out/checkpoint-{2,4,6}/`` (model.safetensors, config, tokenizer, training
    state) and ``out/model.safetensors`` (``save_model``); ``sharded/``: the same
    checkpoints re-saved by ``save_pretrained(max_shard_size="20KB")`` beside the
    Trainer's other files."""
    import importlib.util

    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("hf")
    out = base / "out"
    if importlib.util.find_spec("accelerate") is not None:
        _train_with_trainer(out)
    else:
        _train_by_hand(out)
    sharded = base / "sharded"
    for step in STEPS:
        src, dst = out / f"checkpoint-{step}", sharded / f"checkpoint-{step}"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
        GPT2LMHeadModel.from_pretrained(src).save_pretrained(dst, max_shard_size="20KB")
    return out, sharded


def _mean_of(ckpt_dirs) -> dict[str, np.ndarray]:
    """float64 mean of each tensor, read by the safetensors library from each checkpoint."""
    sums: dict[str, np.ndarray] = {}
    for d in ckpt_dirs:
        tensors = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            tensors.update(load_st(f)[0])
        for k, v in tensors.items():
            sums[k] = sums.get(k, 0) + v.astype(np.float64)
    return {k: v / len(ckpt_dirs) for k, v in sums.items()}


def _assert_loads_as_mean(avg: Path, ckpt_dirs) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    ref = _mean_of(ckpt_dirs)
    model = GPT2LMHeadModel.from_pretrained(avg)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert ref, "no reference tensors"
    for k, r in ref.items():
        got = state[k]
        assert got.dtype == np.float32 and got.shape == r.shape, k
        # one rounding of the float64 mean to float32, at most
        assert np.all(np.abs(got.astype(np.float64) - r) <= np.spacing(np.abs(r).astype(np.float32))), k
    # the average differs from every single checkpoint (so the test would see a wrong pick)
    last = {}
    for f in sorted(Path(ckpt_dirs[-1]).glob("*.safetensors")):
        last.update(load_st(f)[0])
    assert any(not np.array_equal(state[k], last[k]) for k in ref)
    tok = AutoTokenizer.from_pretrained(avg)
    assert tok("w1 w2 w97")["input_ids"] == [1, 2, 97]


def test_trainer_dir_averages_its_checkpoints_and_loads(hf_run, tmp_path):
    out, _ = hf_run
    ckpts = [out / f"checkpoint-{s}" for s in STEPS]
    assert (out / "model.safetensors").is_file() and all((c / "model.safetensors").is_file() for c in ckpts)
    assert all((c / "optimizer.pt").is_file() and (c / "trainer_state.json").is_file() for c in ckpts)

    res = run_cli("plan", out, "--json", env=HF_ENV)
    assert res.code == 0, res
    doc = res.json()
    assert [Path(c["path"]).parent.name for c in doc["checkpoints"]] == [f"checkpoint-{s}" for s in STEPS]
    assert [c["step"] for c in doc["checkpoints"]] == list(STEPS)
    assert any(str(out / "model.safetensors") in w and "left out" in w for w in doc["warnings"]), doc["warnings"]

    avg = tmp_path / "avg"
    res = run_cli(out, "-o", f"{avg}/", "--json", env=HF_ENV)
    assert res.code == 0, res
    warned = [ln for ln in res.err.splitlines() if ln.startswith("warning: ")]
    assert any(str(out / "model.safetensors") in ln for ln in warned), res
    names = {p.name for p in avg.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names, names
    assert not names & TRAINING_STATE, names
    assert json.loads((avg / ".ema-avg.json").read_text())["files"] == sorted(names - {".ema-avg.json"})
    assert sorted(res.json()["files"]) == sorted(str(avg / n) for n in names - {".ema-avg.json"})
    _assert_loads_as_mean(avg, ckpts)

    # the top-level model can still be named explicitly (it is then one more input)
    res = run_cli("plan", out, out / "model.safetensors", "--json", "--order", "given", env=HF_ENV)
    assert res.code == 0 and len(res.json()["checkpoints"]) == 4, res


def test_sharded_checkpoints_in_sharded_output_out(hf_run, tmp_path):
    _, sharded = hf_run
    ckpts = [sharded / f"checkpoint-{s}" for s in STEPS]
    assert all(len(list(c.glob("model-*-of-*.safetensors"))) > 1 for c in ckpts)
    res = run_cli("plan", sharded, "--json", "--quiet", env=HF_ENV)
    assert res.code == 0 and [c["step"] for c in res.json()["checkpoints"]] == list(STEPS), res

    avg = tmp_path / "avg_sharded"
    res = run_cli(sharded, "-o", f"{avg}/", "--max-shard-size", "50KB", env=HF_ENV)
    assert res.code == 0 and res.err == "", res  # no top-level model here: nothing left out
    shards = sorted(avg.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (avg / "model.safetensors.index.json").is_file()
    assert not (avg / "model.safetensors").exists()
    assert (avg / "config.json").is_file() and not {p.name for p in avg.iterdir()} & TRAINING_STATE
    _assert_loads_as_mean(avg, ckpts)


def test_force_never_deletes_what_ema_avg_did_not_write(hf_run, tmp_path):
    out, _ = hf_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    ckpts = [run / f"checkpoint-{s}" for s in STEPS]
    before = {p: p.read_bytes() for c in ckpts for p in c.iterdir()}

    # a user's directory: refused, even with --force, naming the foreign file
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README").write_text("my notes")
    assert_clean_error(run_cli(run, "-o", notes, "--force", env=HF_ENV), "README", "did not write")
    assert (notes / "README").read_text() == "my notes" and [p.name for p in notes.iterdir()] == ["README"]

    # an output directory that contains an input, at any depth
    res = run_cli(*ckpts, "-o", run, "--force", env=HF_ENV)
    assert_clean_error(res, "contains an input")
    res = run_cli(*ckpts, "-o", tmp_path, "--force", env=HF_ENV)
    assert_clean_error(res, "contains an input")
    assert {p: p.read_bytes() for c in ckpts for p in c.iterdir()} == before

    # an empty directory is written without --force; then it is ema-avg's output
    avg = tmp_path / "avg"
    avg.mkdir()
    assert run_cli(*ckpts, "-o", avg, "--quiet", env=HF_ENV).code == 0
    assert_clean_error(run_cli(*ckpts, "-o", avg, env=HF_ENV), "exists", "--force")
    # --force replaces exactly ema-avg's files: single file -> shards, the old model.safetensors goes
    res = run_cli(*ckpts, "-o", avg, "--force", "--max-shard-size", "50KB", "--quiet", env=HF_ENV)
    assert res.code == 0, res
    assert not (avg / "model.safetensors").exists() and (avg / "model.safetensors.index.json").is_file()
    listed = json.loads((avg / ".ema-avg.json").read_text())["files"]
    assert sorted(p.name for p in avg.iterdir() if p.name != ".ema-avg.json") == listed
    assert not list(tmp_path.glob(".avg.ema-avg-*")) and not list(tmp_path.glob("avg.ema-avg-kept-*"))
    _assert_loads_as_mean(avg, ckpts)

    # a file the user added to ema-avg's output makes it foreign: refused, file kept
    (avg / "eval.txt").write_text("acc 0.9")
    assert_clean_error(run_cli(*ckpts, "-o", avg, "--force", env=HF_ENV), "eval.txt")
    assert (avg / "eval.txt").read_text() == "acc 0.9" and (avg / "model.safetensors.index.json").is_file()

    # a re-run over the run directory leaves an ema-avg output inside it out, with a warning
    inner = run / "avg"
    assert run_cli(run, "-o", inner, "--quiet", env=HF_ENV).code == 0
    res = run_cli("plan", run, "--json", env=HF_ENV)
    assert res.code == 0 and len(res.json()["checkpoints"]) == 3, res
    assert any("ema-avg output" in w and str(inner) in w for w in res.json()["warnings"]), res


def test_tf_into_a_directory(tmp_path):
    import tensorflow as tf

    src = FIXTURES / "tf2"
    out = tmp_path / "tfout"
    res = run_cli(src, "-o", f"{out}/", "--json")
    assert res.code == 0, res
    assert len(res.json()["checkpoints"]) == 3
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint" in names and "model.ckpt.index" in names
    assert any(n.startswith("model.ckpt.data-") for n in names), names
    assert tf.train.latest_checkpoint(str(out)) == str(out / "model.ckpt")
    # the same tensors as the prefix output (-o avg.ckpt), read back by TensorFlow
    (tmp_path / "prefix").mkdir()
    assert run_cli(src, "-o", tmp_path / "prefix" / "avg.ckpt", "--quiet").code == 0
    got, ref = tf.train.load_checkpoint(str(out / "model.ckpt")), tf.train.load_checkpoint(str(tmp_path / "prefix" / "avg.ckpt"))
    dtypes = ref.get_variable_to_dtype_map()
    assert got.get_variable_to_dtype_map() == dtypes
    for name in dtypes:
        assert np.array_equal(got.get_tensor(name), ref.get_tensor(name)), name
    # and they are the mean of the inputs where the inputs differ (the model weights)
    readers = [tf.train.load_checkpoint(str(src / f"ckpt-{k}")) for k in (1, 2, 3)]
    moved = [n for n, dt in dtypes.items() if dt.is_floating
             and not np.array_equal(readers[0].get_tensor(n), readers[-1].get_tensor(n))]
    assert moved
    means = [n for n in moved if np.allclose(got.get_tensor(n), np.mean([r.get_tensor(n) for r in readers], axis=0))]
    assert means
    # --force over ema-avg's TF directory replaces exactly its files
    assert run_cli(src, "-o", out, "--force", "--decay", "0.5", "--quiet").code == 0
    assert sorted(p.name for p in out.iterdir()) == names


# ---------------------------------------------------------------- directory rules (no torch)


def _st(path: Path, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_st(path, {"w": np.full(3, k, np.float32)}, metadata={"format": "pt"})


def test_directory_rules(tmp_path):
    # several checkpoints at the top and checkpoint sub-directories: ambiguous, an error that says what to name
    d = tmp_path / "mixed"
    _st(d / "ckpt-1.safetensors", 1)
    _st(d / "ckpt-2.safetensors", 2)
    _st(d / "best" / "model.safetensors", 3)
    assert_clean_error(run_cli("plan", d), "ambiguous", "best")
    assert run_cli("plan", d / "best", d / "ckpt-1.safetensors", "--quiet").code == 0

    # one top-level checkpoint and one sub-directory: ambiguous too
    d = tmp_path / "one_each"
    _st(d / "model.safetensors", 1)
    _st(d / "checkpoint-5" / "model.safetensors", 5)
    assert_clean_error(run_cli("plan", d), "ambiguous")

    # sub-directories judged by content: any name; hidden ones (staging), empty ones and
    # ones with several checkpoints (warned) are not inputs
    d = tmp_path / "subs"
    for k, name in [(1, "step_100"), (2, "epoch_3"), (3, "global_step300"), (4, "iter_0400"), (5, "final")]:
        _st(d / name / "model.safetensors", k)
    _st(d / ".avg.ema-avg-1-abcd.tmp" / "model.safetensors", 9)
    (d / "runs").mkdir()
    (d / "runs" / "events.out").write_text("x")
    _st(d / "series" / "a-1.safetensors", 1)
    _st(d / "series" / "a-2.safetensors", 2)
    res = run_cli("plan", d, "--json", "--order", "given")
    assert res.code == 0, res
    got = sorted(Path(c["path"]).parent.name for c in res.json()["checkpoints"])
    assert got == sorted(["step_100", "epoch_3", "global_step300", "iter_0400", "final"])
    assert any("series" in w and "several" in w for w in res.json()["warnings"]), res

    # only sub-directories with several checkpoints: an error that names them
    d = tmp_path / "series_only"
    _st(d / "ema005" / "a-1.safetensors", 1)
    _st(d / "ema005" / "a-2.safetensors", 2)
    assert_clean_error(run_cli("plan", d), "no checkpoints", "ema005")


def test_output_paths(tmp_path):
    ins = []
    for k in (1, 2):
        _st(tmp_path / "in" / f"c-{k}.safetensors", k)
        ins.append(tmp_path / "in" / f"c-{k}.safetensors")
    # a name with no suffix is a directory in the inputs' format
    res = run_cli(*ins, "-o", tmp_path / "plain", "--verify", "--json")
    assert res.code == 0 and res.json()["format"] == "safetensors", res
    assert load_st(tmp_path / "plain" / "model.safetensors")[0]["w"].tolist() == [1.5] * 3
    # HDF5 (Keras) inputs into a directory: DIR/model.weights.h5, loadable as the inputs are
    res = run_cli(FIXTURES / "keras", "-o", f"{tmp_path / 'kdir'}/", "--quiet")
    assert res.code == 0, res
    assert sorted(p.name for p in (tmp_path / "kdir").iterdir()) == [".ema-avg.json", "model.weights.h5"]
    # a file output is still a file
    assert run_cli(*ins, "-o", tmp_path / "a.safetensors", "--quiet").code == 0
    assert (tmp_path / "a.safetensors").is_file()
    # a file where a directory output goes: refused
    (tmp_path / "afile").write_text("x")
    assert_clean_error(run_cli(*ins, "-o", f"{tmp_path / 'afile'}/", "--force"), "not a directory")
    # a flat input directory: nothing but the weights is copied, other checkpoints are not mentioned
    res = run_cli(tmp_path / "in", "-o", tmp_path / "flat", "--json")
    assert res.code == 0 and "warning" not in res.err, res
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == [".ema-avg.json", "model.safetensors"]
    # unknown files beside the newest checkpoint are named, not copied; weights in another format never copied
    (tmp_path / "in" / "pytorch_model.bin").write_bytes(b"not ours")
    (tmp_path / "in" / "config.json").write_text("{}")
    res = run_cli(tmp_path / "in", "-o", tmp_path / "flat2")
    assert res.code == 0 and "pytorch_model.bin" in res.err, res
    assert sorted(p.name for p in (tmp_path / "flat2").iterdir()) == [".ema-avg.json", "config.json", "model.safetensors"]
