"""Issue 12: scale-out figures, in one run, versions printed.

* in-process threads vs ``--dask local:2`` on 8 checkpoints x 256 MB (float32),
  into a sharded output (both into the same directory layout);
* local disk vs moto S3 (a real S3 server on 127.0.0.1, started here) for the
  same average, S3 for inputs and output.

Every figure is the best of ``--repeat`` runs of the real CLI in a subprocess,
page cache warm.  Ratios are what to read: this machine's disk, cores and
loopback set the absolute times.  Not a test (no assertion on time).

    python bench/bench_scale.py [--size-mb 256] [--n 8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # measured processes keep bytecode caches, as a user's do


def _cli(args, env=None) -> float:
    e = dict(os.environ, **(env or {}))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ema_cli", *map(str, args), "--quiet", "--force"], env=e,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"bench: ema-avg failed: {p.stderr.strip()}")
    return dt


def _best(fn, repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--shard", default="64MB")
    a = ap.parse_args()

    import dask
    import distributed
    import fsspec
    import moto
    import s3fs

    import ema_cli

    print(f"python {platform.python_version()}, numpy {np.__version__}, ema-avg {ema_cli.__version__}, "
          f"dask {dask.__version__}, distributed {distributed.__version__}, fsspec {fsspec.__version__}, "
          f"s3fs {s3fs.__version__}, moto {moto.__version__}; {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f} at the start")
    from safetensors.numpy import save_file

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        rng = np.random.default_rng(0)
        per = a.size_mb * (1 << 20) // 4 // 16
        ins = tmp / "in"
        ins.mkdir()
        for k in range(a.n):
            save_file({f"layer{i}.weight": rng.standard_normal(per, dtype=np.float32) for i in range(16)},
                      str(ins / f"ckpt-{k + 1}.safetensors"))
        inputs = sorted(ins.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in inputs)
        print(f"inputs: {a.n} x {inputs[0].stat().st_size / 1e6:.0f} MB float32, 16 tensors each; "
              f"output sharded at {a.shard}")

        def floor_read():  # the floor: reading every input byte once (page cache) with numpy
            t0 = time.perf_counter()
            for p in inputs:
                with open(p, "rb") as fh:
                    while fh.readinto(buf):
                        pass
            return time.perf_counter() - t0

        buf = bytearray(16 << 20)
        floor = _best(floor_read, a.repeat)
        threads = _best(lambda: _cli([*inputs, "-o", f"{tmp}/out-threads/", "--max-shard-size", a.shard]), a.repeat)
        dask_t = _best(lambda: _cli([*inputs, "-o", f"{tmp}/out-dask/", "--max-shard-size", a.shard,
                                     "--dask", "local:2"]), a.repeat)
        import logging

        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        client = Client(cluster)
        dask_addr = _best(lambda: _cli([*inputs, "-o", f"{tmp}/out-dask2/", "--max-shard-size", a.shard,
                                        "--dask", cluster.scheduler_address]), a.repeat)
        client.close()
        cluster.close()
        print(f"read floor (every input byte once, page cache): {floor:.2f} s ({total / floor / 1e9:.2f} GB/s)")
        print(f"in-process threads:           {threads:.2f} s  ({threads / floor:.1f}x the read floor)")
        print(f"--dask local:2:               {dask_t:.2f} s  ({dask_t / threads:.2f}x threads; starts the cluster)")
        print(f"--dask ADDRESS (2 workers up): {dask_addr:.2f} s  ({dask_addr / threads:.2f}x threads)")

        # local disk vs moto S3
        from moto.server import ThreadedMotoServer

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        server = ThreadedMotoServer("127.0.0.1", port, verbose=False)
        server.start()
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
               "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        os.environ.update(env)
        fs = s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"], key="bench", secret="bench")
        fs.mkdir("bench")
        for p in inputs:  # one at a time (moto's in-memory multipart uploads are not safe in parallel)
            fs.put_file(str(p), f"bench/in/{p.name}")
        def s3_floor():  # every input byte once from the server: one GET per file, nothing else
            t0 = time.perf_counter()
            for p in inputs:
                fs.cat_file(f"bench/in/{p.name}")
            return time.perf_counter() - t0

        s3_read = _best(s3_floor, a.repeat)
        local_t = _best(lambda: _cli([*inputs, "-o", f"{tmp}/local.safetensors"]), a.repeat)
        s3_in = _best(lambda: _cli(["s3://bench/in/*.safetensors", "-o", f"{tmp}/from-s3.safetensors"], env), a.repeat)
        s3_both = _best(lambda: _cli(["s3://bench/in/*.safetensors", "-o", "s3://bench/out/avg.safetensors"], env),
                        a.repeat)
        print(f"local disk -> local:  {local_t:.2f} s")
        print(f"moto S3 read floor (one GET per input file): {s3_read:.2f} s ({total / s3_read / 1e6:.0f} MB/s)")
        print(f"moto S3 -> local:     {s3_in:.2f} s  ({s3_in / local_t:.2f}x local, {s3_in / s3_read:.2f}x the S3 read floor)")
        print(f"moto S3 -> moto S3:   {s3_both:.2f} s  ({s3_both / local_t:.2f}x local, {s3_both / s3_read:.2f}x the S3 read floor)")
        server.stop()
        print(f"load {os.getloadavg()[0]:.2f} at the end")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
