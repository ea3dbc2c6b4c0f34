"""PyTorch checkpoints (torch_fmt): files written by real torch (and real
transformers / huggingface_hub objects), averaged by the real CLI, read back by
torch.load(weights_only=True) and model.load_state_dict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import ROOT, assert_clean_error, load_st, run_cli, save_st

torch = pytest.importorskip("torch")  # a test extra: its absence is reported by the import below
import torch.nn as nn  # noqa: E402


def load(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)


def f64(t) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


class Tiny(nn.Module):
    """Embedding tied to the output projection (fairseq's share_all_embeddings,
    HF's tie_word_embeddings), a BatchNorm (float buffers, an int counter)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, x):
        return self.lm_head(self.bn(self.proj(self.embed_tokens(x))))


def train_steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 11, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()


def within_half_ulp(out: np.ndarray, ref: np.ndarray) -> bool:
    """``out`` (float32) is ``ref`` (float64) correctly rounded (a 1e-9 slack for
    the order of float64 operations)."""
    r32 = ref.astype(np.float32)
    half = np.abs(np.spacing(r32)).astype(np.float64) / 2
    return bool(np.all(np.abs(out.astype(np.float64) - ref) <= half * (1 + 1e-9)))


# --------------------------------------------------------------------------- fairseq


def fairseq_run(d: Path, n: int = 4):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    d.mkdir()
    sds = []
    for k in range(1, n + 1):
        train_steps(model, opt, 3, k)
        sd = model.state_dict()
        ckpt = {"model": sd, "args": None, "optimizer_history": [{"criterion_name": "CE", "num_updates": 3 * k}],
                "extra_state": {"num_updates": 3 * k, "train_iterator": {"epoch": k}},
                "last_optimizer_state": opt.state_dict()}
        torch.save(ckpt, d / f"checkpoint_{k}.pt")
        sds.append({kk: v.clone() for kk, v in sd.items()})
    # fairseq also leaves checkpoint_last.pt / checkpoint_best.pt copies: not used here
    return sds


def test_fairseq_last_n_mean_and_tie(tmp_path):
    sds = fairseq_run(tmp_path / "run")
    res = run_cli("plan", tmp_path / "run", "--last-n", "3", "--json", "-q")
    assert res.code == 0, res
    doc = res.json()
    assert [c["step"] for c in doc["checkpoints"]] == [3, 6, 9, 12]
    assert all(c["step_from"] == "tensor" for c in doc["checkpoints"])
    out = tmp_path / "avg.pt"
    res = run_cli(tmp_path / "run", "--last-n", "3", "-o", out)
    assert res.code == 0, res
    got = load(out)
    newest = load(tmp_path / "run" / "checkpoint_4.pt")
    assert list(got) == list(newest)
    assert got["extra_state"] == newest["extra_state"] and got["optimizer_history"] == newest["optimizer_history"]
    assert got["args"] is None
    # optimizer state: the newest's, verbatim
    for k, st in newest["last_optimizer_state"]["state"].items():
        for kk, v in st.items():
            assert torch.equal(got["last_optimizer_state"]["state"][k][kk], v)
    m = got["model"]
    assert list(m) == list(sds[-1])
    for name, v in m.items():
        if v.is_floating_point():
            ref = sum(f64(sd[name]) for sd in sds[1:]) / 3
            assert v.dtype == torch.float32
            assert within_half_ulp(v.numpy(), ref), name
        else:
            assert torch.equal(v, sds[-1][name]), name
    # the tie survives: one storage under both names, so load_state_dict keeps them tied
    assert m["lm_head.weight"].data_ptr() == m["embed_tokens.weight"].data_ptr()
    model = Tiny()
    model.load_state_dict(m)
    assert model.lm_head.weight is model.embed_tokens.weight
    # inspect shows where the state dict is and the tie
    res = run_cli("inspect", tmp_path / "run" / "checkpoint_1.pt", "--json", "-q")
    assert res.code == 0, res
    doc = res.json()
    rows = {t["name"]: t for t in (doc[0] if isinstance(doc, list) else doc)["tensors"]}
    assert "tied to embed_tokens.weight" in rows["lm_head.weight"]["why"]
    assert rows["bn.num_batches_tracked"]["kind"] == "other"
    assert rows["bn.running_var"]["kind"] == "buffer"
    assert not any(n.startswith(("last_optimizer_state", "extra_state")) for n in rows)


def test_reader_structure_and_state_key(tmp_path):
    """In-process: extras() (what inspect can show) and --state-key's reader side."""
    from ema_cli.formats import open_reader, resolve_inputs
    from ema_cli.formats.torch_fmt import TorchReader

    torch.manual_seed(1)
    model, ema = Tiny(), Tiny()
    p = tmp_path / "checkpoint-7.pth.tar"  # timm's layout
    torch.save({"epoch": 7, "arch": "tiny", "state_dict": model.state_dict(), "optimizer": {"state": {},
                "param_groups": []}, "state_dict_ema": ema.state_dict(), "metric": 0.5}, p)
    (src,) = resolve_inputs([str(p)])
    r = open_reader(src)
    x = r.extras()
    assert x["state_dict"] == "state_dict" and x["tied"] == {"lm_head.weight": "embed_tokens.weight"}
    assert set(x["outside_state_dict"]) == {"epoch", "arch", "optimizer", "state_dict_ema", "metric"}
    assert r.step() == 7
    np.testing.assert_array_equal(r.read("proj.weight"), model.proj.weight.detach().numpy())
    r2 = TorchReader(src, state_key="state_dict_ema")
    np.testing.assert_array_equal(r2.read("proj.weight"), ema.proj.weight.detach().numpy())
    from ema_cli.errors import EmaError

    with pytest.raises(EmaError, match="no key 'nope'"):
        TorchReader(src, state_key="nope")


# --------------------------------------------------------------------------- Lightning


LIGHTNING_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
                  "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters")


def test_lightning_ema_in_step_order(tmp_path):
    """Files as Lightning's ModelCheckpoint names them; the loss in the name would
    sort them wrongly.  EMA with TF's float32 decay rule, in step order."""
    torch.manual_seed(2)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    d = tmp_path / "ckpts"
    d.mkdir()
    losses = [0.9, 0.3, 0.7, 0.1]
    sds = []
    for e in range(4):
        train_steps(model, opt, 5, e)
        sched.step()
        step = 5 * (e + 1)
        ck = {"epoch": e, "global_step": step, "pytorch-lightning_version": "2.4.0",
              "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
              "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": e}}}},
              "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(losses[e])}},
              "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
              "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1}}
        torch.save(ck, d / f"epoch={e}-step={step}-val_loss={losses[e]:.2f}.ckpt")
        sds.append({k: v.detach().clone() for k, v in ck["state_dict"].items()})
    torch.save(ck, d / "last.ckpt")  # ModelCheckpoint(save_last=True): a copy of the newest
    out = tmp_path / "ema.pt"
    res = run_cli(d, "--decay", "0.6", "--dtype", "float64", "-o", out)
    assert res.code == 0, res
    assert "skipped last.ckpt" in res.err
    got = load(out)
    newest = load(d / "epoch=3-step=20-val_loss=0.10.ckpt")
    assert tuple(got) == LIGHTNING_KEYS and tuple(newest) == LIGHTNING_KEYS
    assert got["global_step"] == 20 and got["epoch"] == 3 and got["loops"] == newest["loops"]
    assert got["lr_schedulers"] == newest["lr_schedulers"] and got["hyper_parameters"] == {"lr": 0.1}
    for k, st in newest["optimizer_states"][0]["state"].items():
        assert torch.equal(got["optimizer_states"][0]["state"][k]["momentum_buffer"], st["momentum_buffer"])
    om = float(np.float32(1) - np.float32(0.6))
    for name in sds[0]:
        if not sds[0][name].is_floating_point():
            assert torch.equal(got["state_dict"][name], sds[-1][name])
            continue
        ref = f64(sds[0][name])
        for sd in sds[1:]:
            ref = ref * (1 - om) + om * f64(sd[name])
        np.testing.assert_allclose(f64(got["state_dict"][name]), ref, rtol=1e-12, atol=1e-14, err_msg=name)


# --------------------------------------------------------------------------- HF Trainer (pytorch_model.bin)


def exact_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 correctly rounded (nearest, ties to even), by comparing
    the neighbouring bfloat16 values in float64: an oracle independent of ema-avg."""
    approx = x.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.int64)
    cands = np.stack([approx - 1, approx, approx + 1]) & 0xFFFF
    vals = cands.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
    err = np.abs(vals - x)
    err[np.isnan(err)] = np.inf  # a neighbour's bits may be a NaN (0xFFFF below 0)
    best = err.min(axis=0)
    ok = err == best
    even = (cands & 1) == 0
    pick = np.where(ok & even, 0, 1) * 10 + np.where(ok, 0, 1)  # exact-best and even first
    idx = pick.argmin(axis=0)
    return np.take_along_axis(cands, idx[None], axis=0)[0].astype(np.uint16)


def hf_trainer_run(d: Path, n: int = 4, sharded: bool = False):
    """checkpoint-N/ folders as transformers < 4.35 wrote them with
    save_safetensors=False: pytorch_model.bin (torch.save of the state dict) or
    shards with their index (huggingface_hub's splitter), plus the Trainer's
    training state (optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     vocab_size=40, max_position_embeddings=16)
    model = BertModel(cfg).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sds = []
    for k in range(1, n + 1):
        x = torch.randint(0, 40, (2, 8))
        model(input_ids=x).last_hidden_state.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        step = 10 * k
        c = d / f"checkpoint-{step}"
        c.mkdir(parents=True)
        sd = model.state_dict()
        if sharded:
            split = split_torch_state_dict_into_shards(sd, filename_pattern="pytorch_model{suffix}.bin",
                                                       max_shard_size=4000)
            assert len(split.filename_to_tensors) > 1
            for fname, names in split.filename_to_tensors.items():
                torch.save({nm: sd[nm].contiguous() for nm in names}, c / fname)
            (c / "pytorch_model.bin.index.json").write_text(json.dumps(
                {"metadata": split.metadata, "weight_map": split.tensor_to_filename}))
        else:
            torch.save(sd, c / "pytorch_model.bin")
        torch.save(opt.state_dict(), c / "optimizer.pt")
        torch.save(sched.state_dict(), c / "scheduler.pt")
        torch.save({"python": 1, "cpu": torch.get_rng_state()}, c / "rng_state.pth")
        # the Trainer pickles its TrainingArguments object here (which needs accelerate to
        # pickle); a transformers config object stands in: it too needs full unpickling
        torch.save(cfg, c / "training_args.bin")
        (c / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        sds.append({kk: v.clone() for kk, v in sd.items()})
    return model, sds


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_pytorch_model_bin_bf16_mean_is_correctly_rounded(tmp_path, sharded):
    model, sds = hf_trainer_run(tmp_path / "out", sharded=sharded)
    res = run_cli("plan", tmp_path / "out", "--json", "-q")
    assert res.code == 0, res
    doc = res.json()
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20, 30, 40]  # one checkpoint per folder
    assert all(c["path"].endswith("pytorch_model.bin" + (".index.json" if sharded else "")) for c in doc["checkpoints"])
    out = tmp_path / "avg.bin"
    res = run_cli(tmp_path / "out", "-o", out)
    assert res.code == 0, res
    got = load(out)
    assert list(got) == list(sds[-1])
    for name, v in got.items():
        if not v.is_floating_point():
            assert torch.equal(v, sds[-1][name])
            continue
        assert v.dtype == torch.bfloat16, name
        ref = sum(f64(sd[name]) for sd in sds) / 4
        want = exact_bf16(ref)
        np.testing.assert_array_equal(v.view(torch.int16).numpy().view(np.uint16), want, err_msg=name)
    model.load_state_dict(got)


def test_training_state_files_are_not_checkpoints(tmp_path):
    hf_trainer_run(tmp_path / "out", n=1)
    c = tmp_path / "out" / "checkpoint-10"
    res = run_cli("plan", c, "--json", "-q", "--allow-copy-only")
    assert res.code == 0, res
    assert [Path(x["path"]).name for x in res.json()["checkpoints"]] == ["pytorch_model.bin"]
    # named explicitly: refused by content
    res = run_cli(c / "optimizer.pt", c / "pytorch_model.bin", "-o", tmp_path / "x.pt")
    assert_clean_error(res, "optimizer.pt", "optimizer state dict")
    res = run_cli(c / "training_args.bin", c / "pytorch_model.bin", "-o", tmp_path / "x.pt")
    assert_clean_error(res, "training_args.bin", "needs full unpickling", "BertConfig")
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- safety


def test_full_unpickling_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    code = f"""
import torch, sys
class Evil:
    def __reduce__(self):
        return (exec, ("open({str(marker)!r}, 'w').write('ran')",))
torch.save({{"model": {{"w": torch.ones(2)}}, "hook": Evil()}}, sys.argv[1])
"""
    good = tmp_path / "checkpoint_1.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, good)
    bad = tmp_path / "checkpoint_2.pt"
    subprocess.run([sys.executable, "-c", code, str(bad)], check=True)
    out = tmp_path / "avg.pt"
    for cmd in (["inspect", bad], [good, bad, "-o", out]):
        res = run_cli(*cmd)
        assert_clean_error(res, str(bad), "needs full unpickling", "refers to exec")
        assert not marker.exists()
    assert not out.exists()
    # the marker works: full unpickling does run the file's code
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(bad)!r}, weights_only=False)"], check=True)
    assert marker.read_text() == "ran"


def test_custom_class_is_refused_with_its_name(tmp_path):
    marker = tmp_path / "constructed"
    mod = tmp_path / "mylib.py"
    mod.write_text(f"""
class Scaler:
    def __init__(self):
        self.s = 2.0
    def __setstate__(self, state):
        open({str(marker)!r}, 'w').write('unpickled')
        self.__dict__.update(state)
""")
    p = tmp_path / "model.pt"
    subprocess.run([sys.executable, "-c", f"import torch, mylib; torch.save({{'w': torch.ones(3), 's': mylib.Scaler()}}, "
                    f"{str(p)!r})"], check=True, cwd=tmp_path)
    marker.unlink(missing_ok=True)
    res = run_cli(p, "-o", tmp_path / "avg.pt", cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert_clean_error(res, "model.pt", "needs full unpickling", "mylib.Scaler")
    assert not marker.exists()


def test_legacy_format_is_read_with_a_warning(tmp_path):
    ws = []
    for k in (1, 2):
        w = torch.randn(4, 3)
        torch.save({"state_dict": {"w": w}, "global_step": k}, tmp_path / f"m{k}.pt",
                   _use_new_zipfile_serialization=False)
        ws.append(w)
    out = tmp_path / "avg.pt"
    res = run_cli(tmp_path / "m1.pt", tmp_path / "m2.pt", "-o", out)
    assert res.code == 0, res
    assert "legacy (non-zip) PyTorch file: loaded whole" in res.err
    assert within_half_ulp(load(out)["state_dict"]["w"].numpy(), (f64(ws[0]) + f64(ws[1])) / 2)


@pytest.mark.parametrize("damage", ["truncate", "storage", "not-torch"])
def test_corrupt_files_give_one_clean_error(tmp_path, damage):
    good = tmp_path / "checkpoint_1.pt"
    torch.save({"model": {"w": torch.randn(64, 64)}}, good)
    bad = tmp_path / "checkpoint_2.pt"
    raw = good.read_bytes()
    if damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "storage":
        # a tensor whose shape needs more bytes than its storage holds
        torch.save({"model": {"w": torch.randn(64, 64)}}, bad)
        import zipfile

        with zipfile.ZipFile(bad) as z:
            pkl = z.read("checkpoint_2/data.pkl")
            entries = {i.filename: z.read(i.filename) for i in z.infolist()}
        small = torch.randn(10)
        torch.save({"model": {"w": small}}, tmp_path / "small.pt")
        with zipfile.ZipFile(tmp_path / "small.pt") as z:
            entries["checkpoint_2/data/0"] = z.read("small/data/0")
        assert pkl
        with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as z:
            for n, b in entries.items():
                z.writestr(n, b)
    else:
        bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "avg.pt"
    res = run_cli(good, bad, "-o", out)
    assert_clean_error(res, str(bad))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------- cross-format


def test_pt_to_safetensors_and_back(tmp_path):
    sds = fairseq_run(tmp_path / "run", n=2)
    st = tmp_path / "avg.safetensors"
    res = run_cli(tmp_path / "run", "-o", st)
    assert res.code == 0, res
    tensors, meta = load_st(st)
    assert meta["format"] == "pt"  # transformers refuses safetensors metadata without it
    assert set(tensors) == set(sds[0])  # every name, tied ones included (one copy each)
    for name in sds[0]:
        if sds[0][name].is_floating_point():
            assert within_half_ulp(tensors[name], (f64(sds[0][name]) + f64(sds[1][name])) / 2), name
    model = Tiny()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(st)))

    # safetensors in -> .pt out: a plain state dict
    d = tmp_path / "st"
    d.mkdir()
    for k, sd in enumerate(sds):
        save_st(d / f"model-{k + 1}.safetensors", {n: v.numpy() for n, v in sd.items()})
    out = tmp_path / "avg.pth"
    res = run_cli(d, "-o", out)
    assert res.code == 0, res
    got = load(out)
    assert isinstance(got, dict) and set(got) == set(load_st(d / "model-2.safetensors")[0])
    for name, v in got.items():
        np.testing.assert_array_equal(v.numpy(), tensors[name])
    Tiny().load_state_dict(got)


def test_pt_output_is_refused_when_sharded(tmp_path):
    fairseq_run(tmp_path / "run", n=2)
    res = run_cli(tmp_path / "run", "-o", tmp_path / "avg.pt", "--max-shard-size", "200B")
    assert_clean_error(res, "single file")


def test_output_routing_rules():
    from ema_cli import formats
    from ema_cli.formats import torch_fmt

    assert formats.output_format("avg.pt", None) == "torch" and formats.output_format("x/avg.bin", None) == "torch"
    assert formats.output_format("avg.ckpt", None) == "tf"  # a TF prefix unless the inputs say otherwise
    assert not torch_fmt.is_output("pytorch_model.bin.index.json")
    assert torch_fmt.is_output_given_inputs("epoch=1-step=9.ckpt", {"torch"})
    assert not torch_fmt.is_output_given_inputs("avg.ckpt", {"torch", "tf"})
