"""Issue 12: checkpoints in object storage (fsspec) and averaging on a Dask cluster.

Real components, started by the tests themselves: moto's S3 server on
127.0.0.1 (its own WSGI app, wrapped to count the bytes it serves), reached
through s3fs with an endpoint URL; ``distributed.LocalCluster``s of 2 worker
processes.  The checkpoints are written by ``transformers``' own
``save_pretrained`` (sharded) after real optimizer steps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_error, run_cli
from test_verify_staging import FLIP  # a byte flipped after the safetensors writer wrote it

pytest.importorskip("moto")
pytest.importorskip("s3fs")
pytest.importorskip("distributed")

BUCKET = "ckpts"


# --------------------------------------------------------------------------- S3 server


class _Counting:
    """WSGI middleware: the bytes of every response body moto sends for a GET."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.get_bytes = 0
        self.requests: list[tuple[str, str, str]] = []

    def __call__(self, environ, start_response):
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        rng = environ.get("HTTP_RANGE", "")
        with self.lock:
            self.requests.append((method, path, rng))
        body = self.app(environ, start_response)
        if method != "GET":
            return body

        def counted():
            try:
                for chunk in body:
                    with self.lock:
                        self.get_bytes += len(chunk)
                    yield chunk
            finally:
                close = getattr(body, "close", None)
                if close:
                    close()
        return counted()

    def reset(self):
        with self.lock:
            self.get_bytes = 0
            self.requests.clear()


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the environment that points s3fs at it."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    counting = _Counting(DomainDispatcherApplication(create_backend_app))

    class Server(ThreadedMotoServer):
        def _server_entry(self):
            self._server = make_server(self._ip_address, self._port, counting, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = Server("127.0.0.1", port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    fs.mkdir(BUCKET)
    try:
        yield {"fs": fs, "env": env, "endpoint": endpoint, "counter": counting}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _objects(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(fs.find(f"{BUCKET}/{prefix}"))
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------- checkpoints


def _tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


@pytest.fixture(scope="module")
def hf_ckpts(tmp_path_factory):
    """``run/checkpoint-{2,4,6}/``: a tiny GPT-2 after real AdamW steps, each saved
    sharded by ``save_pretrained(max_shard_size="100KB")``."""
    import torch

    root = tmp_path_factory.mktemp("scale") / "run"
    model = _tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 7):
        x = torch.randint(0, 256, (4, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            model.save_pretrained(root / f"checkpoint-{step}", max_shard_size="100KB")
    assert len(list((root / "checkpoint-2").glob("model-*.safetensors"))) >= 3
    return root


def _upload(s3, local: Path, prefix: str) -> str:
    s3["fs"].put(str(local), f"{BUCKET}/{prefix}", recursive=True)
    s3["fs"].invalidate_cache()
    return f"s3://{BUCKET}/{prefix}"


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file or HF sharded directory, as raw bytes."""
    from safetensors import safe_open

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def _same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


# --------------------------------------------------------------------------- S3


def test_s3_inputs_and_outputs_bit_identical(s3, hf_ckpts, tmp_path):
    """Remote inputs give the local bits; remote outputs (one object, HF shards)
    hold them too; the index is committed; no staging objects are left."""
    url = _upload(s3, hf_ckpts, "run1")
    local = tmp_path / "local.safetensors"
    r = run_cli(str(hf_ckpts), "--decay", "0.9", "-o", local, "--quiet")
    assert r.code == 0, r
    ref = _tensors(local)

    r = run_cli(url, "--decay", "0.9", "-o", tmp_path / "from_s3.safetensors", "--quiet", "--json")
    assert r.code == 0, r
    _same_bits(_tensors(tmp_path / "from_s3.safetensors"), ref)
    assert [c["path"] for c in r.json()["checkpoints"]][0].startswith("s3://")

    out = f"s3://{BUCKET}/out/avg.safetensors"
    r = run_cli(url, "--decay", "0.9", "-o", out, "--quiet")
    assert r.code == 0, r
    s3["fs"].get(f"{BUCKET}/out/avg.safetensors", str(tmp_path / "got.safetensors"))
    _same_bits(_tensors(tmp_path / "got.safetensors"), ref)
    assert run_cli(url, "--decay", "0.9", "-o", out, "--quiet").code != 0  # exists: no --force
    assert run_cli(url, "--decay", "0.9", "-o", out, "--quiet", "--force").code == 0

    out = f"s3://{BUCKET}/out/sharded/"
    r = run_cli(url, "--decay", "0.9", "-o", out, "--max-shard-size", "60KB", "--quiet", "--json")
    assert r.code == 0, r
    keys = [k.rsplit("/", 1)[-1] for k in _objects(s3["fs"], "out/sharded")]
    assert "model.safetensors.index.json" in keys and ".ema-avg.json" in keys
    assert sum(k.endswith(".safetensors") for k in keys) >= 3
    assert "config.json" in keys  # the loader files of the newest checkpoint
    s3["fs"].get(f"{BUCKET}/out/sharded/", str(tmp_path / "got_sharded"), recursive=True)
    _same_bits(_tensors(tmp_path / "got_sharded"), ref)
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(tmp_path / "got_sharded")  # the layout loads
    assert not [k for k in _objects(s3["fs"], "out") if "ema-avg-staging" in k]


@pytest.mark.parametrize("layout", ["file", "shards", "tf"])
def test_s3_verify_reads_the_staged_objects_back(s3, hf_ckpts, tmp_path, layout):
    """--verify on an S3 output reopens what the store holds under the staging
    prefix, before the commit: a byte changed after the writer wrote it fails
    the run with nothing at the output key and no staging objects left; the
    same run without the fault commits."""
    url = _upload(s3, hf_ckpts, f"verify-{layout}")
    out, extra = {"file": (f"s3://{BUCKET}/v-{layout}/avg.safetensors", []),
                  "shards": (f"s3://{BUCKET}/v-{layout}/avg/", ["--max-shard-size", "60KB"]),
                  "tf": (f"s3://{BUCKET}/v-{layout}/model.ckpt", [])}[layout]
    args = [url, "--decay", "0.9", "-o", out, *extra, "--verify"]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("EMA_AVG_DEBUG", None)
    if layout != "tf":  # (the TF writer is not the safetensors one the fault is injected into)
        p = subprocess.run([sys.executable, "-c", FLIP, *args], capture_output=True, text=True, env=env,
                           timeout=300, stdin=subprocess.DEVNULL)
        assert_clean_error(CliOf(p), "verify: values differ", out.rstrip("/"), code=1)
        assert _objects(s3["fs"], f"v-{layout}") == []
    r = run_cli(*args, "--json")
    assert r.code == 0, r
    assert r.json()["verified"] is True and "verify_s" in r.json()["timings"]
    keys = _objects(s3["fs"], f"v-{layout}")
    assert keys and not [k for k in keys if "ema-avg-staging" in k], keys


def test_s3_output_errors_name_the_url(s3, tmp_path):
    """An error while a task writes a remote output (here: PyTorch not
    importable, a package that raises ModuleNotFoundError shadowing it) names
    the output URL, not the task's local scratch directory, and leaves no object."""
    shim = tmp_path / "not-installed" / "torch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}
    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "safetensors"
    out = f"s3://{BUCKET}/named/avg.pt"
    r = run_cli(fixtures, "-o", out, env=env)
    line = assert_clean_error(r, f"error: {out}: ", "pip install 'ema-avg[torch]'", code=1)
    assert "ema-avg-task" not in line and "staging" not in line, line
    assert _objects(s3["fs"], "named") == []


def test_s3_failed_and_killed_runs_leave_nothing(s3, hf_ckpts, tmp_path):
    """A failing run deletes its staging objects and writes no output; a killed
    run's staging objects are deleted by the next run, which succeeds."""
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(hf_ckpts, bad)
    shard = sorted((bad / "checkpoint-6").glob("model-*.safetensors"))[-1]
    t = load_file(str(shard))
    name = sorted(t)[-1]
    t[name] = np.full_like(t[name], np.nan)
    save_file(t, str(shard), metadata={"format": "pt"})
    url = _upload(s3, bad, "bad")
    out = f"s3://{BUCKET}/fail/sharded/"
    r = run_cli(url, "-o", out, "--max-shard-size", "60KB", "--quiet")
    assert_clean_error(r, "NaN", f"{url}/checkpoint-6/model.safetensors.index.json")  # the URL as it is
    assert _objects(s3["fs"], "fail") == []

    # killed: SIGKILL once the first staging object is there
    url = _upload(s3, hf_ckpts, "run2")
    out = f"s3://{BUCKET}/killed/avg/"
    env = dict(os.environ, **s3["env"])
    proc = subprocess.Popen([sys.executable, "-m", "ema_cli", url, "-o", out, "--max-shard-size", "20KB",
                             "--threads", "1", "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    staged = []
    while time.time() < deadline and proc.poll() is None:
        staged = [k for k in _objects(s3["fs"], "killed") if "ema-avg-staging" in k]
        if staged:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    if staged:  # (a run that finished first commits: nothing to test then)
        assert not [k for k in _objects(s3["fs"], "killed/avg") if "staging" not in k]
        assert [k for k in _objects(s3["fs"], "killed") if "ema-avg-staging" in k]
    r = run_cli(url, "-o", out, "--max-shard-size", "20KB", "--quiet", "--force")
    assert r.code == 0, r
    assert not [k for k in _objects(s3["fs"], "killed") if "ema-avg-staging" in k]
    assert "model.safetensors.index.json" in [k.rsplit("/", 1)[-1] for k in _objects(s3["fs"], "killed/avg")]


def test_s3_bad_inputs_and_foreign_outputs_are_clean_errors(s3, hf_ckpts, tmp_path):
    """A missing object, and a remote output directory holding an object
    ema-avg did not write (refused even with --force, the object kept): one
    error line each, nothing written."""
    url = _upload(s3, hf_ckpts, "run3")
    r = run_cli(f"s3://{BUCKET}/nothing/here.safetensors", "-o", tmp_path / "x.safetensors")
    assert_clean_error(r, f"s3://{BUCKET}/nothing/here.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    s3["fs"].pipe_file(f"{BUCKET}/theirs/notes.txt", b"keep me")
    for extra in ([], ["--force"]):
        r = run_cli(url, "-o", f"s3://{BUCKET}/theirs/", "--max-shard-size", "60KB", "--quiet", *extra)
        assert_clean_error(r, "did not write", "notes.txt")
    assert _objects(s3["fs"], "theirs") == [f"{BUCKET}/theirs/notes.txt"]


def test_s3_reads_are_ranged(s3, tmp_path):
    """Only the bytes a run needs are requested: the header and the tensors it
    reads, never whole files."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    big = 8 << 20  # float32 elements: 32 MB per tensor
    d = tmp_path / "large"
    d.mkdir()
    for step in (1, 2, 3):
        save_file({"big": rng.standard_normal(big, dtype=np.float32),
                   "small": rng.standard_normal(16, dtype=np.float32)}, str(d / f"ckpt-{step}.safetensors"))
    url = _upload(s3, d, "large")
    size = (d / "ckpt-1.safetensors").stat().st_size
    counter = s3["counter"]

    counter.reset()
    r = run_cli("plan", f"{url}/*.safetensors", "--json")
    assert r.code == 0, r
    assert counter.get_bytes < 3 * 70_000, counter.get_bytes  # headers only (64 KiB read each at most)

    counter.reset()
    r = run_cli(f"{url}/*.safetensors", "--include", "^small$", "--exclude", "^big$", "-o",
                tmp_path / "one.safetensors", "--quiet")
    assert r.code == 0, r
    # averaging one small tensor: its 3 ranges, the headers, and the newest big tensor (copied)
    assert counter.get_bytes < 1.05 * size, (counter.get_bytes, size)
    assert counter.get_bytes < 0.4 * 3 * size
    ranged = [rq for rq in counter.requests if rq[0] == "GET" and rq[2]]
    assert ranged and all(rq[2].startswith("bytes=") for rq in ranged)

    counter.reset()
    r = run_cli(f"{url}/*.safetensors", "-o", tmp_path / "all.safetensors", "--quiet")
    assert r.code == 0, r
    assert 3 * size * 0.99 < counter.get_bytes < 3 * size * 1.05  # all of it, once


def test_remote_tf_input_is_copied_locally(s3, tmp_path):
    """A TF checkpoint in S3 is copied to a local temporary directory first (its
    library needs local files), with a note, and averages like the local one."""
    from conftest import FIXTURES

    url = _upload(s3, FIXTURES / "tf1", "tf1")
    r = run_cli(url, "-o", tmp_path / "a.safetensors", "--json")
    assert r.code == 0, r
    assert "local temporary directory" in r.err
    assert r.json().get("copied"), r.out
    r2 = run_cli(FIXTURES / "tf1", "-o", tmp_path / "b.safetensors", "--quiet")
    assert r2.code == 0, r2
    _same_bits(_tensors(tmp_path / "a.safetensors"), _tensors(tmp_path / "b.safetensors"))


# --------------------------------------------------------------------------- Dask


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, reached by its address like any cluster."""
    import logging

    from distributed import Client, LocalCluster

    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                     silence_logs=logging.ERROR)
    client = Client(c)
    try:
        yield {"address": c.scheduler_address, "client": client}
    finally:
        client.close()
        c.close()


def test_dask_local_bit_identical_and_spread(hf_ckpts, tmp_path):
    """``--dask local:2``: the in-process bits, the shards computed on both workers."""
    ref = tmp_path / "ref"
    r = run_cli(hf_ckpts, "-o", f"{ref}/", "--max-shard-size", "60KB", "--quiet")
    assert r.code == 0, r
    out = tmp_path / "dask"
    r = run_cli(hf_ckpts, "-o", f"{out}/", "--max-shard-size", "60KB", "--dask", "local:2", "--json", "--quiet")
    assert r.code == 0, r
    _same_bits(_tensors(out), _tensors(ref))
    doc = r.json()
    tasks = doc["tasks"]
    assert len(tasks) == len(list(out.glob("model-*.safetensors"))) >= 3
    assert {"shard", "worker", "bytes_read", "bytes_written", "seconds"} <= set(tasks[0])
    assert len({t["worker"] for t in tasks}) >= 2, tasks
    assert sum(t["bytes_written"] for t in tasks) == doc["bytes_written"]


@pytest.mark.parametrize("mode", [["--decay", "0.8"], ["--half-life", "2", "--decay-per", "step"]],
                         ids=["ema", "per-step-ema"])
def test_dask_cluster_address_bit_identical(cluster, hf_ckpts, tmp_path, mode):
    """``--dask ADDRESS`` (a running scheduler): EMA and per-step EMA give the
    in-process bits; a directory output is split into one shard per worker."""
    ref = tmp_path / "ref.safetensors"
    assert run_cli(hf_ckpts, *mode, "-o", ref, "--quiet").code == 0
    out = tmp_path / "dask"
    r = run_cli(hf_ckpts, *mode, "-o", f"{out}/", "--dask", cluster["address"], "--json", "--quiet")
    assert r.code == 0, r
    assert len(list(out.glob("model-*-of-00002.safetensors"))) == 2
    _same_bits(_tensors(out), _tensors(ref))
    assert len({t["worker"] for t in r.json()["tasks"]}) == 2


def test_dask_worker_killed_mid_task(cluster, tmp_path):
    """A worker killed while tasks run: Dask reruns its task elsewhere and the
    output is the in-process one, or the run fails cleanly with nothing
    committed.  (The nanny restarts the worker.)"""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    d = tmp_path / "in"
    d.mkdir()
    for step in (1, 2, 3):
        save_file({f"layer{i}": rng.standard_normal(1 << 20, dtype=np.float32) for i in range(16)},
                  str(d / f"ckpt-{step}.safetensors"))
    ref = tmp_path / "ref.safetensors"
    assert run_cli(d, "-o", ref, "--quiet").code == 0
    client = cluster["client"]
    pids = client.run(os.getpid)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ema_cli", str(d), "-o", f"{out}/", "--max-shard-size", "4MB",
                             "--dask", cluster["address"], "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    killed = False
    while time.time() < deadline and proc.poll() is None:
        staged = [p for p in tmp_path.glob(".out.ema-avg-*") if any(p.glob("model-*.safetensors"))]
        if staged:
            os.kill(next(iter(pids.values())), signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    print("killed:", killed, "exit:", proc.returncode, err[-300:])
    assert "Traceback" not in err, err
    if proc.returncode == 0:
        _same_bits(_tensors(out), _tensors(ref))
    else:
        assert err.strip().startswith("error: "), err
        assert not out.exists()
    assert killed, "the run finished before a worker could be killed: make it longer"
    client.wait_for_workers(2, timeout=60)


def test_dask_needs_sharded_output(hf_ckpts, tmp_path):
    r = run_cli(hf_ckpts, "-o", tmp_path / "one.h5", "--dask", "local:1", "--quiet")
    assert_clean_error(r, "shard")


def test_storage_option_gives_the_endpoint(s3, tmp_path):
    """Without fsspec's environment configuration, ``--storage-option`` reaches
    the store; with neither, the error is one line naming the URL."""
    from safetensors.numpy import save_file

    d = tmp_path / "so"
    d.mkdir()
    for step in (1, 2):
        save_file({"w": np.full(4, step, dtype=np.float32)}, str(d / f"ckpt-{step}.safetensors"))
    url = _upload(s3, d, "so")
    env = {k: v for k, v in os.environ.items() if k != "FSSPEC_S3_ENDPOINT_URL"}
    out = tmp_path / "avg.safetensors"
    cmd = [sys.executable, "-m", "ema_cli", url, "-o", str(out), "--quiet"]
    p = subprocess.run(cmd + ["--storage-option", f"endpoint_url={s3['endpoint']}"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert _tensors(out)["w"].tolist() == [1.5] * 4
    env["AWS_ENDPOINT_URL_S3"] = "http://127.0.0.1:9"  # nothing listens there: no real AWS is ever asked
    p = subprocess.run(cmd + ["--force"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and url in lines[0], p.stderr


def _options_only(s3):
    """The environment of a run that reaches the moto server only through
    ``--storage-option`` (no fsspec environment configuration; without the
    option nothing answers, so no real AWS is asked), the option, and a CLI
    runner in it: ``cli(*args, ok=True)`` asserts the exit code's success."""
    env = {k: v for k, v in os.environ.items() if k != "FSSPEC_S3_ENDPOINT_URL"}
    env["AWS_ENDPOINT_URL_S3"] = "http://127.0.0.1:9"
    env.pop("EMA_AVG_DEBUG", None)

    def cli(*args, ok=True):
        p = subprocess.run([sys.executable, "-m", "ema_cli", *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert (p.returncode == 0) == ok, (args, p.stderr)
        return p

    return env, ["--storage-option", f"endpoint_url={s3['endpoint']}"], cli


def test_every_command_takes_storage_options(s3, hf_ckpts, tmp_path):
    """plan, inspect, rename, restore-map and posthoc reach the store through
    ``--storage-option`` alone (no fsspec environment configuration), remote
    globs included, and give what they give on the same files locally."""
    url = _upload(s3, hf_ckpts, "so-all")
    _env, opt, cli = _options_only(s3)

    def doc(*args):
        return json.loads(cli(*args).stdout)

    # plan over a remote glob: the same steps and weights as locally
    remote = doc("plan", f"{url}/checkpoint-*", "--decay", "0.5", "--json", *opt)
    local = doc("plan", hf_ckpts, "--decay", "0.5", "--json")
    assert [(c["step"], c["weight"]) for c in remote["checkpoints"]] == \
        [(c["step"], c["weight"]) for c in local["checkpoints"]] and len(remote["checkpoints"]) == 3
    assert_clean_error(CliOf(cli("plan", f"{url}/checkpoint-*", "--decay", "0.5", ok=False)), url)
    # inspect: the same rows
    rows = lambda d: [(t["name"], t["dtype"], t["shape"], t["role"]) for t in d["tensors"]]  # noqa: E731
    assert rows(doc("inspect", f"{url}/checkpoint-6", "--json", *opt)) == \
        rows(doc("inspect", hf_ckpts / "checkpoint-6", "--json"))
    # rename, S3 to S3 (HF shards), then restore-map on the renamed copy
    avg_local = tmp_path / "avg"
    cli(hf_ckpts, "-o", avg_local, "--max-shard-size", "100KB", "--quiet")
    avg_url = _upload(s3, avg_local, "so-avg")
    cli("rename", avg_url, "--to-shadow", "-o", f"s3://{BUCKET}/so-renamed/", "--max-shard-size", "100KB",
        "--quiet", *opt)
    cli("rename", avg_local, "--to-shadow", "-o", tmp_path / "renamed", "--max-shard-size", "100KB", "--quiet")
    got = tmp_path / "renamed-from-s3"
    s3["fs"].invalidate_cache()
    s3["fs"].get(f"{BUCKET}/so-renamed", str(got), recursive=True)
    _same_bits(_tensors(got), _tensors(tmp_path / "renamed"))
    assert any(k.endswith("/ExponentialMovingAverage") for k in _tensors(got))
    m_remote = json.loads(cli("restore-map", f"s3://{BUCKET}/so-renamed/", *opt).stdout)
    assert m_remote == json.loads(cli("restore-map", tmp_path / "renamed").stdout) and m_remote
    map_url = f"s3://{BUCKET}/so-map.json"  # the map written to the store: one object
    cli("restore-map", f"s3://{BUCKET}/so-renamed/", "-o", map_url, "--quiet", *opt)
    s3["fs"].invalidate_cache()
    assert json.loads(s3["fs"].cat_file(f"{BUCKET}/so-map.json")) == m_remote
    assert_clean_error(CliOf(cli("restore-map", f"s3://{BUCKET}/so-renamed/", "-o", map_url, *opt, ok=False)),
                       map_url, "--force", code=1)
    cli("restore-map", f"s3://{BUCKET}/so-renamed/", "-o", map_url, "--force", "--quiet", *opt)
    # posthoc: a remote glob of snapshots
    out_r, out_l = tmp_path / "ph-remote.safetensors", tmp_path / "ph-local.safetensors"
    cli("posthoc", "--from", f"0.05={url}/checkpoint-*", "--sigma-rel", "0.04", "-o", out_r, "--quiet", *opt)
    cli("posthoc", "--from", f"0.05={hf_ckpts}/checkpoint-*", "--sigma-rel", "0.04", "-o", out_l, "--quiet")
    _same_bits(_tensors(out_r), _tensors(out_l))


class CliOf:
    """A subprocess result in the shape ``assert_clean_error`` reads."""

    def __init__(self, p):
        self.code, self.out, self.err = p.returncode, p.stdout, p.stderr

    def __repr__(self):
        return f"<exit {self.code}: {self.err[-2000:]}>"


_LIBRARY_CALLS = r"""
import json, sys
import ema_cli
url, out, endpoint = sys.argv[1:]
res = ema_cli.average(url, out, decay=0.9, storage_options={"endpoint_url": endpoint})
print(json.dumps({"first": res.averaged + res.copied}))
try:  # the next call gives no options: it must not reach the store through the first call's
    ema_cli.plan(url, decay=0.9)
except ema_cli.EmaError as e:
    print(json.dumps({"second": str(e)}))
else:
    print(json.dumps({"second": None}))
"""


def test_storage_options_reach_every_output_and_stay_with_their_call(s3, hf_ckpts, tmp_path):
    """``--storage-option`` alone (no fsspec environment configuration) writes
    S3 outputs: one object, HF shards with --verify, a TF checkpoint, shards
    computed on Dask workers (other processes), an object named with no
    format's suffix (--format, --verify), each with the local bits; and a local
    directory output gets the loader files copied from the store.  In
    the library the options belong to the call that got them: a later call
    without options does not reach the store through them."""
    url = _upload(s3, hf_ckpts, "so-out")
    env, opt, cli = _options_only(s3)

    local = tmp_path / "local"
    local.mkdir()
    assert run_cli(hf_ckpts, "--decay", "0.9", "-o", local / "avg.safetensors", "--quiet").code == 0
    assert run_cli(hf_ckpts, "--decay", "0.9", "-o", f"{local}/shards/", "--max-shard-size", "60KB",
                   "--quiet").code == 0
    ref = _tensors(local / "avg.safetensors")
    base = f"s3://{BUCKET}/so-out-results"
    cli(url, "--decay", "0.9", "-o", f"{base}/avg.safetensors", "--quiet", *opt)
    cli(url, "--decay", "0.9", "-o", f"{base}/shards/", "--max-shard-size", "60KB", "--verify", "--quiet", *opt)
    cli(url, "--decay", "0.9", "-o", f"{base}/dask/", "--max-shard-size", "60KB", "--dask", "local:2", "--quiet",
        *opt)
    cli(url, "--decay", "0.9", "-o", f"{base}/tf/model.ckpt", "--quiet", *opt)
    # a name no format claims, the format given: --verify reopens the staged object as that format
    cli(url, "--decay", "0.9", "-o", f"{base}/avg.weights", "--format", "safetensors", "--verify", "--quiet", *opt)
    # a local directory output copies the loader files from the store
    cli(url, "--decay", "0.9", "-o", f"{tmp_path}/localdir/", "--max-shard-size", "60KB", "--quiet", *opt)
    _same_bits(_tensors(tmp_path / "localdir"), _tensors(local / "shards"))
    assert (tmp_path / "localdir" / "config.json").read_bytes() == (hf_ckpts / "checkpoint-6" / "config.json").read_bytes()
    got = tmp_path / "got"
    s3["fs"].get(f"{BUCKET}/so-out-results/", str(got), recursive=True)
    _same_bits(_tensors(got / "avg.safetensors"), ref)
    _same_bits(_tensors(got / "shards"), _tensors(local / "shards"))
    _same_bits(_tensors(got / "dask"), _tensors(local / "shards"))
    from safetensors.numpy import load_file

    _same_bits(load_file(str(got / "avg.weights")), ref)
    from ema_cli.formats import tf_bundle

    b = tf_bundle.Bundle(str(got / "tf" / "model.ckpt"))
    try:
        assert {n: b.read(n).tobytes() for n in ref} == {n: a.tobytes() for n, a in ref.items()}
    finally:
        b.close()
    assert not [k for k in _objects(s3["fs"], "so-out-results") if "ema-avg-staging" in k]

    p = subprocess.run([sys.executable, "-c", _LIBRARY_CALLS, url, f"{base}/lib.safetensors", s3["endpoint"]],
                       env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    first, second = (json.loads(line) for line in p.stdout.splitlines())
    assert first["first"] == len(ref)
    assert second["second"] is not None and url in second["second"], second


def test_range_array_serves_the_bytes():
    """The kernel's view of a remote tensor: slices in order and out of order,
    across windows, through a dtype view, equal the bytes they stand for."""
    from ema_cli.storage import RangeArray

    rng = np.random.default_rng(5)
    data = rng.standard_normal(300_000).astype(np.float32).tobytes()
    calls = []

    def get(a, b):
        calls.append((a, b))
        return b"\x00" * 8 + data if a < 0 else data[a - 8:b - 8]

    ref = np.frombuffer(data, dtype=np.float32)
    ra = RangeArray(get, 8, ref.size, np.float32, window=1 << 18)
    got = np.concatenate([ra[i:i + 65536] for i in range(0, ref.size, 65536)])
    assert got.tobytes() == data
    assert np.array_equal(ra[1000:1010], ref[1000:1010])  # back to an earlier window: fetched again
    bits = ra.view(np.uint32)
    assert np.array_equal(bits[70000:70016], ref.view(np.uint32)[70000:70016])
    assert np.array_equal(np.asarray(ra), ref)
    # window-sized requests, but for the whole range np.asarray asked for (read-ahead
    # threads may append theirs after it: not by position)
    whole = (8, 8 + len(data))
    assert max(b - a for a, b in calls if (a, b) != whole) <= 1 << 18
