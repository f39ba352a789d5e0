#!/usr/bin/env python
"""Real-batch delivery rate and peak memory per worker vs dataset size, for prepared datasets (local and S3) and
for the in-memory loader they replace; printed as ONE JSON object.

For each size (synthetic uint8 images generated on the fly, seeded) the dataset is written as an ``.npz`` and
prepared with ``ray_jobs.datasets.prepare_dataset`` into a local folder and into S3 (a moto server started here,
on loopback, objects in its memory). Then ``--workers`` processes (spawned, one torch thread each, like Ray Train
workers on one node) each stage the dataset (S3: the first copies it into a fresh node cache, the others wait on
the lock) and draw real micro-batches exactly as ``Distiller._real_batch`` does (``EpochOrder`` positions for
their rank, ``images[idx]``, xflip) for ``--seconds``. Each reports images/s, its RSS after imports and its peak RSS
(Linux ``VmHWM``). The ``memory`` rows do the same with ``data.kind: npz`` (the whole set decoded to float32 in
every process), the path prepared datasets replace, up to ``--memory-max-images`` (a worker that dies, e.g. killed
for memory, is reported with its exit status).

Consumption: the SiDA step (``benchmarks/step_throughput.py``, both updates + EMA) at the CIFAR-10 preset's
per-worker batch on this machine, one thread per worker; ``delivery_over_consumption`` = slowest worker's delivery
rate / that step's images/s (the issue asks for >= 10).

    python benchmarks/data_throughput.py                       # 1k, 20k, 200k images of 32x32x3
    python benchmarks/data_throughput.py --small               # CI: 500 and 2000 images, tiny consumption net
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vm(field: str) -> int:
    """A /proc/self/status size in bytes (VmRSS, VmHWM); 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker(job: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from ray_jobs.datasets import stage_dataset
    from schemas.run import DataConfig
    from sida_core.data import EpochOrder, load_images

    rss_base = vm("VmRSS")
    t0 = time.perf_counter()
    if job["mode"] == "prepared":
        folder = stage_dataset(job["uri"], endpoint_url=job["endpoint"], cache_root=Path(job["cache"]))
        cfg = DataConfig(kind="prepared", path=str(folder), resolution=job["res"], channels=job["ch"], holdout_fraction=0)
    else:
        cfg = DataConfig(kind="npz", path=job["npz"], resolution=job["res"], channels=job["ch"], holdout_fraction=0)
    ds = load_images(cfg)
    open_s = time.perf_counter() - t0
    order, b, rank, world = EpochOrder(len(ds), 0), job["batch"], job["rank"], job["world"]
    gen = torch.Generator().manual_seed(rank)
    n, step, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < job["seconds"]:
        idx = torch.from_numpy(order.indices(step * b * world + rank * b, b))
        x = ds.images[idx]
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        n, step = n + b, step + 1
    sec = time.perf_counter() - t0
    assert np.isfinite(float(x.sum()))
    return {"rank": rank, "images_per_s": round(n / sec, 1), "open_s": round(open_s, 3),
            "rss_after_imports_mb": round(rss_base / 2**20, 1), "peak_rss_mb": round(vm("VmHWM") / 2**20, 1),
            "peak_over_imports_mb": round((vm("VmHWM") - rss_base) / 2**20, 1)}


def _child(job: dict, out: str) -> None:
    Path(out).write_text(json.dumps(worker(job)))


def run_workers(jobs: list[dict]) -> list[dict]:
    """Run the jobs in concurrent spawned processes; a process that dies (e.g. killed for memory) becomes a row
    with its exit status instead of hanging the benchmark."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [(ctx.Process(target=_child, args=(job, f"{tmp}/{i}.json")), f"{tmp}/{i}.json") for i, job in enumerate(jobs)]
        for proc, _ in procs:
            proc.start()
        for proc, _ in procs:
            proc.join()
        return [json.loads(Path(out).read_text()) if proc.exitcode == 0
                else {"rank": i, "error": f"worker exited with status {proc.exitcode}"
                                          + (" (killed: out of memory?)" if proc.exitcode == -9 else "")}
                for i, (proc, out) in enumerate(procs)]


def consumption(a) -> dict:
    """Images/s of one SiDA step (both updates + EMA; ``benchmarks/step_throughput.py``'s setup) at the CIFAR-10
    preset's per-worker batch and network, one thread, as one of ``--workers`` workers on this node would run it
    (``--small``: a tiny net). The first step is timed (no warm-up): on a CPU a DDPM++ step takes minutes."""
    import torch

    from benchmarks import step_throughput as st

    torch.set_num_threads(1)
    argv = (["--model-channels", "8", "--channel-mult", "1,2", "--resolution", "8", "--batch", "8"] if a.small
            else ["--net", "cifar10-ddpmpp", "--batch", str(a.batch)])
    sa = st.parse_args([*argv, "--device", "cpu", "--steps", str(a.consumption_steps), "--warmup", "0"])
    teacher, _ = st.build_teacher(sa, torch.device("cpu"))
    real = torch.rand((4 * sa.batch, sa.channels, sa.resolution, sa.resolution)) * 2 - 1
    out = st.measure("sida", sa, teacher, real, None, torch.device("cpu"), st.CpuPeakRSS())
    return {"net": sa.net if not a.small else "songunet 8ch 8px (--small)", "batch_per_worker": sa.batch,
            "threads": 1, "timed_steps": sa.steps, "sida_images_per_s": out["images_per_s"],
            "parameters_per_network": st.count_parameters(teacher)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,20000,200000", help="dataset sizes (images), comma-separated")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="real micro-batch per worker (CIFAR-10 preset: 32)")
    p.add_argument("--seconds", type=float, default=4.0, help="timed reading per worker and case")
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--memory-max-images", type=int, default=20000,
                   help="in-memory loader rows only up to this size (0: none); it needs ~60 bytes per pixel value "
                        "and process (200k 32x32x3 images: ~12 GB per worker, more than this machine has for two)")
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument("--consumption-steps", type=int, default=1, help="timed SiDA steps of the consumption net")
    p.add_argument("--small", action="store_true", help="CI size: 500 and 2000 images, 1 s, tiny consumption net")
    a = p.parse_args(argv)
    if a.small:
        a.sizes, a.seconds, a.shard_size = "500,2000", 1.0, 256
    import numpy as np

    from ray_jobs.datasets import prepare_dataset

    def log(m):
        print(m, file=sys.stderr, flush=True)

    sizes = [int(s) for s in a.sizes.split(",")]
    server = None
    if not a.skip_s3:
        from tests.s3_server import CREDENTIALS, start_moto_server

        os.environ.update(CREDENTIALS)
        server = start_moto_server()
        server.create_bucket("bench")
    tmp = Path(tempfile.mkdtemp(prefix="sida-data-bench-"))
    rows = []
    try:
        for n in sizes:
            rng = np.random.default_rng(n)
            npz = tmp / f"synthetic-{n}.npz"
            np.savez(npz, images=rng.integers(0, 256, (n, a.resolution, a.resolution, a.channels), dtype=np.uint8),
                     labels=rng.integers(0, 10, n))
            stores = [("local", str(tmp / f"prepared-{n}"), None)]
            if server is not None:
                stores.append(("s3", f"s3://bench/prepared-{n}", server.endpoint_url))
            for store, uri, endpoint in stores:
                t0 = time.perf_counter()
                prepare_dataset(str(npz), uri, shard_size=a.shard_size, endpoint_url=endpoint, progress=False,
                                log=lambda m: None)
                prep_s = time.perf_counter() - t0
                cache = tmp / f"cache-{store}-{n}"
                jobs = [dict(mode="prepared", uri=uri, endpoint=endpoint, cache=str(cache), npz=None, res=a.resolution,
                             ch=a.channels, batch=a.batch, rank=r, world=a.workers, seconds=a.seconds)
                        for r in range(a.workers)]
                res = run_workers(jobs)
                rows.append(summarise(f"prepared/{store}", n, res, prepare_s=prep_s))
                log(f"{n} images, prepared/{store}: {rows[-1]}")
                shutil.rmtree(cache, ignore_errors=True)
            if n <= a.memory_max_images:
                jobs = [dict(mode="memory", npz=str(npz), res=a.resolution, ch=a.channels, batch=a.batch, rank=r,
                             world=a.workers, seconds=a.seconds) for r in range(a.workers)]
                rows.append(summarise("memory (data.kind npz)", n, run_workers(jobs)))
                log(f"{n} images, memory: {rows[-1]}")
            npz.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            server.stop()
    cons = consumption(a)
    prepared = [r for r in rows if r["path"].startswith("prepared") and "error" not in r]
    slowest = min(r["images_per_s_min_worker"] for r in prepared)
    by_path: dict[str, list] = {}
    for r in rows:
        if "error" not in r:
            by_path.setdefault(r["path"], []).append(r)
    growth = {k: {"images": [v[0]["images"], v[-1]["images"]],
                  "peak_rss_ratio": round(v[-1]["peak_rss_mb_max_worker"] / v[0]["peak_rss_mb_max_worker"], 3),
                  "peak_over_imports_mb": [v[0]["peak_over_imports_mb_max_worker"], v[-1]["peak_over_imports_mb_max_worker"]]}
              for k, v in by_path.items()}
    return {"benchmark": "real-batch delivery per worker and peak RSS vs dataset size",
            "python": platform.python_version(), "cpus": os.cpu_count(), "workers": a.workers,
            "batch_per_worker": a.batch, "image_shape": [a.channels, a.resolution, a.resolution], "sizes": sizes,
            "rows": rows, "consumption": cons,
            "delivery_over_consumption": round(slowest / cons["sida_images_per_s"], 1),
            "peak_rss_growth": growth}


def summarise(path: str, n: int, res: list[dict], **extra) -> dict:
    errors = [r["error"] for r in res if "error" in r]
    if errors:
        return {"path": path, "images": n, "error": errors[0], "workers": res}
    return {"path": path, "images": n, **{k: round(v, 2) for k, v in extra.items()},
            "images_per_s_min_worker": min(r["images_per_s"] for r in res),
            "peak_rss_mb_max_worker": max(r["peak_rss_mb"] for r in res),
            "peak_over_imports_mb_max_worker": max(r["peak_over_imports_mb"] for r in res),
            "open_s_max_worker": max(r["open_s"] for r in res), "workers": res}


if __name__ == "__main__":
    print(json.dumps(main()))
