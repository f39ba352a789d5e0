#!/usr/bin/env python
"""What Ray costs: the plain single-process loop against the Ray TorchTrainer loop, plus checkpoint writes.
Prints ONE JSON object as the last line of stdout; progress and logs (Ray's included) go to stderr.

Measured on the same config, nets and batch (default: configs/digits.yaml, its SongUNet with model_channels 16,
batch 128 = 64 per worker x workers x rounds, 1 torch thread per process, CPU):

1. ``plain``: :class:`sida_core.distill.Distiller` built by ``sida_core.training_loop.build_distiller`` and
   stepped in this process, no Ray. Rate over the same steps the Ray rate covers (the first
   ``--log-every-steps`` steps are the warm-up).
2. ``ray_<N>w``: ``pipelines.train.run_train`` (the ``sida train`` driver) with ``--set``-style overrides,
   local storage in a temp folder, N workers. Steady-state rate from the run's Parquet metric rows: images
   between the first and last row / wall time between them (rows carry ``cur_nimg`` and ``time``; every
   row is a Parquet write plus a ``ray.train.report`` on every worker). ``fit_seconds`` is the whole
   ``run_train`` call: config, teacher copy, Ray start-up, worker start-up, the loop, the final checkpoint
   and ``ray.shutdown``.
3. ``ray_overhead_<N>w`` = plain images/s / Ray images/s (steady state; > 1 means Ray is slower).
4. checkpoint writes: ``RunStore.upload_checkpoint`` of a real distill checkpoint (``save_checkpoint`` of the
   plain Distiller's ``state_dict()``) to local storage and to S3 (a moto server started here, as its own
   process on loopback), median of ``--ckpt-repeats``.

Stages: by default every step is a full SiDA step (``stages.fake_score_only_kimg = sid_until_kimg = 0``: psi
update, theta update, EMA), as in benchmarks/step_throughput.py; ``--stage`` picks another. The teacher is
the built-in one but trained for only ``--teacher-kimg`` (default 2) so that the benchmark does not spend
minutes on it: a teacher's quality does not change step speed. ``SIDA_CACHE`` is a temp folder unless set.

Example::

    OMP_NUM_THREADS=1 python benchmarks/ray_overhead.py --kimg 4
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not

STAGES = {  # --stage -> (stages.fake_score_only_kimg, stages.sid_until_kimg), with method sida
    "sida": (0, 0),
    "sid": (0, 1e9),
    "fake_score": (1e9, 1e9),
}


def int_list(text: str) -> list[int]:
    text = text.strip().strip("[]")
    return [int(v) for v in text.replace(",", " ").split()] if text else []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    p.add_argument("--kimg", type=float, default=4.0,
                   help="images per measurement, in thousands (rounded up to whole steps); same for every loop")
    p.add_argument("--batch", type=int, default=128, help="total batch per step (batch.total)")
    p.add_argument("--per-worker", type=int, default=64, help="micro-batch per worker and round (batch.per_worker)")
    p.add_argument("--model-channels", type=int, default=16, help="SongUNet base channels of teacher/G/psi")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (plain loop and each worker)")
    p.add_argument("--workers", type=int_list, default=[1, 2], help="Ray worker counts to measure, e.g. 1,2")
    p.add_argument("--stage", choices=sorted(STAGES), default="sida", help="the stage every step runs in")
    p.add_argument("--teacher-kimg", type=float, default=2.0, help="teacher.train.kimg (speed does not depend on it)")
    p.add_argument("--log-every-steps", type=int, default=2,
                   help="a metrics row (and ray.train.report) every this many steps; also the plain warm-up")
    p.add_argument("--ckpt-repeats", type=int, default=5, help="uploads per store for the checkpoint medians")
    p.add_argument("--skip-s3", action="store_true", help="no moto server, no S3 checkpoint timing")
    p.add_argument("--skip-ray", action="store_true", help="plain loop and checkpoints only")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every loop (repeatable)")
    a = p.parse_args(argv)
    if a.batch <= 0 or a.per_worker <= 0 or a.batch % a.per_worker:
        p.error(f"--batch ({a.batch}) must be a positive multiple of --per-worker ({a.per_worker})")
    for n in a.workers:
        if n < 1 or a.batch % (a.per_worker * n):
            p.error(f"--batch ({a.batch}) must be divisible by --per-worker x workers ({a.per_worker} x {n})")
    if a.log_every_steps < 1 or a.ckpt_repeats < 1 or a.kimg <= 0:
        p.error("--kimg must be > 0, --log-every-steps and --ckpt-repeats >= 1")
    a.steps = max(math.ceil(a.kimg * 1000 / a.batch), 2 * a.log_every_steps)
    a.steps = math.ceil(a.steps / a.log_every_steps) * a.log_every_steps  # the last step is a logged row
    return a


def log(msg: str) -> None:
    print(f"[ray_overhead] {msg}", file=sys.stderr, flush=True)


def kimg_value(nimg: int) -> str:
    """An override value v with int(v * 1000) == nimg exactly (the loops compute their cadence that way)."""
    v = nimg / 1000
    while int(v * 1000) < nimg:
        v = math.nextafter(v, math.inf)
    return repr(v)


def overrides(a, runs_dir: Path) -> list[str]:
    fake, sid_until = STAGES[a.stage]
    total = a.steps * a.batch
    return [
        "method=sida", f"stages.fake_score_only_kimg={fake}", f"stages.sid_until_kimg={sid_until}",
        f"teacher.network.kwargs.model_channels={a.model_channels}", f"teacher.train.kimg={a.teacher_kimg}",
        f"batch.total={a.batch}", f"batch.per_worker={a.per_worker}",
        f"total_kimg={kimg_value(total)}", f"log_every_kimg={kimg_value(a.log_every_steps * a.batch)}",
        f"checkpoint_every_kimg={kimg_value(total)}",  # one checkpoint, at the end (after the last row)
        "device=cpu", "scaling.use_gpu=false", "scaling.cpus_per_worker=1", "max_failures=0",
        f"storage.uri={runs_dir}", *a.overrides,
    ]


def rate_summary(nimg: list[int], times: list[float]) -> dict:
    """Steady-state images/s between the first and the last point, plus the spread of the intervals."""
    rates = [(nimg[i + 1] - nimg[i]) / (times[i + 1] - times[i]) for i in range(len(nimg) - 1)
             if times[i + 1] > times[i]]
    return {"images_per_s": (nimg[-1] - nimg[0]) / (times[-1] - times[0]),
            "window_images": nimg[-1] - nimg[0], "window_s": times[-1] - times[0],
            "interval_images_per_s_min": min(rates), "interval_images_per_s_median": statistics.median(rates),
            "interval_images_per_s_max": max(rates), "interval_images_per_s": [round(r, 1) for r in rates]}


# --------------------------------------------------------------------------------------------- plain loop
def measure_plain(a, cfg, train_set, teacher) -> tuple[dict, object]:
    import torch

    from sida_core.training_loop import build_distiller

    torch.manual_seed(cfg.seed)
    d = build_distiller(cfg, teacher, train_set, torch.device("cpu"))
    nimg, times, stages = [0], [time.time()], set()
    for i in range(a.steps):
        st = d.step()
        nimg.append(d.cur_nimg)
        times.append(time.time())
        stages.add(st["stage"])
        if (i + 1) % max(1, a.steps // 4) == 0:
            log(f"plain: step {i + 1}/{a.steps}, {st['stage']}, {(nimg[-1] - nimg[0]) / (times[-1] - times[0]):.1f} img/s so far")
    w = a.log_every_steps  # the Ray window starts at its first row, after w steps: the same steps here
    steps_s = [times[i + 1] - times[i] for i in range(len(times) - 1)]
    out = {"stages": sorted(stages), "warmup_steps": w, "timed_steps": a.steps - w,
           **rate_summary(nimg[w:], times[w:]),
           "step_s_first": steps_s[0], "step_s_median": statistics.median(steps_s[w:]),
           "step_s_min": min(steps_s[w:]), "step_s_max": max(steps_s[w:])}
    return out, d


# --------------------------------------------------------------------------------------------- Ray loop
def measure_ray(a, n: int, runs_dir: Path) -> dict:
    from pipelines.train import run_train
    from store.run_store import RunStore
    from store.storage import Storage

    import ray

    import ray_jobs.cluster as cluster

    # Time ray.init (inside cluster.connect) and ray.shutdown as run_train calls them: wrapped for this call only.
    marks: dict[str, float] = {}
    real_connect, real_shutdown = cluster.connect, ray.shutdown

    def timed(fn, key: str):
        def wrapper(*args, **kw):
            marks[f"{key}_start"] = time.time()
            try:
                return fn(*args, **kw)
            finally:
                marks[f"{key}_end"] = time.time()
        return wrapper

    timed_connect, timed_shutdown = timed(real_connect, "connect"), timed(real_shutdown, "shutdown")

    name = f"bench-{n}w-{int(time.time())}"
    log(f"ray {n} worker(s): run_train -> {runs_dir / name}")
    cluster.connect, ray.shutdown = timed_connect, timed_shutdown
    try:
        t_call = time.time()
        summary = run_train(a.config, overrides(a, runs_dir), workers=n, name=name, log=log)
        t_done = time.time()
    finally:
        cluster.connect, ray.shutdown = real_connect, real_shutdown
    if summary["status"] != "finished":
        raise RuntimeError(f"ray {n}w run did not finish: {summary}")
    table = RunStore(Storage(str(runs_dir)).child(name)).read_metrics()
    rows = table.select(["cur_nimg", "time", "images_per_s", "num_workers", "stage"]).to_pylist()
    nimg, times = [r["cur_nimg"] for r in rows], [r["time"] for r in rows]
    if len(rows) < 2:
        raise RuntimeError(f"ray {n}w: {len(rows)} metric row(s); need 2 (raise --kimg)")
    steady = rate_summary(nimg, times)
    step_s = steady["window_s"] / (steady["window_images"] / a.batch)
    return {
        "images_per_s": steady["images_per_s"],
        "fit_seconds": t_done - t_call,
        "run_train_seconds": summary["seconds"],
        "first_row_after_s": times[0] - t_call,  # start-up + the first --log-every-steps steps
        # start-up estimate: time to the first row less the first steps at the steady-state step time
        "startup_s_est": times[0] - t_call - nimg[0] / a.batch * step_s,
        "after_last_row_s": t_done - times[-1],  # final checkpoint save + upload + report, Ray shutdown
        # the parts of fit_seconds: driver prep (config, teacher copy) / ray.init / trainer + worker start-up
        # and the first steps up to the first row / ray.shutdown
        "driver_prep_s": marks["connect_start"] - t_call if "connect_start" in marks else None,
        "ray_init_s": marks["connect_end"] - marks["connect_start"] if "connect_end" in marks else None,
        "init_to_first_row_s": times[0] - marks["connect_end"] if "connect_end" in marks else None,
        "ray_shutdown_s": marks["shutdown_end"] - marks["shutdown_start"] if "shutdown_end" in marks else None,
        "steady_step_s": step_s,
        "cumulative_images_per_s_last_row": rows[-1]["images_per_s"],  # the row's own column: from loop start
        "window_images": steady["window_images"], "window_s": steady["window_s"],
        "interval_images_per_s_min": steady["interval_images_per_s_min"],
        "interval_images_per_s_median": steady["interval_images_per_s_median"],
        "interval_images_per_s_max": steady["interval_images_per_s_max"],
        "interval_images_per_s": steady["interval_images_per_s"],  # between consecutive rows, in order
        "metric_rows": len(rows), "stages": sorted({r["stage"] for r in rows}),
        "num_workers_in_rows": sorted({r["num_workers"] for r in rows}),
        "checkpoints": summary["checkpoints"], "status": summary["status"],
    }


# --------------------------------------------------------------------------------------------- checkpoints
def time_uploads(store, src: Path, base_nimg: int, repeats: int) -> list[float]:
    from sida_core import checkpoint as ckpt

    out = []
    for i in range(repeats):
        name = ckpt.checkpoint_name(base_nimg + i + 1)
        t0 = time.perf_counter()
        store.upload_checkpoint(src, name)
        out.append(time.perf_counter() - t0)
    return out


def measure_checkpoints(a, cfg, train_set, distiller, scratch: Path) -> dict:
    from store.run_store import RunStore
    from store.storage import Storage
    from ray_jobs.train import public_config
    from sida_core import checkpoint as ckpt
    from sida_core.training_loop import network_spec

    name = ckpt.checkpoint_name(distiller.cur_nimg)
    t0 = time.perf_counter()
    src = ckpt.save_checkpoint(scratch / "local-ckpt" / name, distiller.state_dict(), kind="distill",
                               kimg=distiller.cur_nimg / 1000, cur_nimg=distiller.cur_nimg,
                               config=public_config(cfg), network=network_spec(cfg, train_set),
                               extra={"method": cfg.method, "step": distiller.step_idx, "run": "ray-overhead-bench"})
    save_s = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in src.iterdir() if p.is_file()}
    out = {"ckpt_mb": sum(files.values()) / 1e6, "ckpt_files": files, "ckpt_save_local_s": save_s,
           "ckpt_repeats": a.ckpt_repeats}

    local = RunStore(Storage(str(scratch / "store")).child("run"))
    ts = time_uploads(local, src, distiller.cur_nimg, a.ckpt_repeats)
    out.update(ckpt_write_local_s=statistics.median(ts), ckpt_write_local_s_all=ts)
    log(f"checkpoint {out['ckpt_mb']:.2f} MB: save {save_s:.3f} s, local upload median {out['ckpt_write_local_s']:.3f} s")

    if a.skip_s3:
        return out
    from tests.s3_server import start_moto_server

    t0 = time.perf_counter()
    server = start_moto_server()
    try:
        out["moto_start_s"] = time.perf_counter() - t0
        server.create_bucket("bench")
        s3 = RunStore(Storage("s3://bench/ray-overhead", endpoint_url=server.endpoint_url, region="us-east-1",
                              access_key_id="testing", secret_access_key="testing").child("run"))
        ts = time_uploads(s3, src, distiller.cur_nimg, a.ckpt_repeats)
        out.update(ckpt_write_s3_s=statistics.median(ts), ckpt_write_s3_s_all=ts)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="sida-bench-read-") as rd:
            s3.fetch_checkpoint(ckpt.checkpoint_name(distiller.cur_nimg + 1), Path(rd))  # download + hash verify
        out["ckpt_read_verify_s3_s"] = time.perf_counter() - t0
        out["s3_endpoint"] = server.endpoint_url
        log(f"checkpoint S3 (moto) upload median {out['ckpt_write_s3_s']:.3f} s, "
            f"read+verify {out['ckpt_read_verify_s3_s']:.3f} s")
    finally:
        server.stop()
    return out


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.environ["SIDA_NUM_THREADS"] = str(a.threads)  # build_trainer's thread count, forwarded to the workers
    scratch = Path(tempfile.mkdtemp(prefix="sida-ray-overhead-"))
    own_cache = "SIDA_CACHE" not in os.environ
    if own_cache:
        os.environ["SIDA_CACHE"] = str(scratch / "cache")
    try:
        return run(a, scratch, own_cache)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(a, scratch: Path, own_cache: bool) -> dict:
    import torch
    from step_throughput import device_name  # same folder: one CPU/GPU naming for both benchmarks

    torch.set_num_threads(a.threads)
    from schemas.loader import load_run_config
    from sida_core.data import load_dataset
    from sida_core.training_loop import get_teacher

    t_start = time.time()
    runs_dir = scratch / "runs"
    cfg = load_run_config(a.config, [*overrides(a, runs_dir), "scaling.num_workers=1"])
    train_set, _ = load_dataset(cfg.data)
    t0 = time.time()
    teacher, teacher_path = get_teacher(cfg, train_set, torch.device("cpu"), log)
    teacher_s = time.time() - t0
    log(f"teacher ready in {teacher_s:.1f} s ({teacher_path}); plain loop: {a.steps} steps of {a.batch}")

    plain, distiller = measure_plain(a, cfg, train_set, teacher)
    log(f"plain: {plain['images_per_s']:.1f} img/s steady")
    ckpt = measure_checkpoints(a, cfg, train_set, distiller, scratch)
    del distiller

    ray_results = {}
    if not a.skip_ray:
        for n in a.workers:
            ray_results[n] = measure_ray(a, n, runs_dir)
            log(f"ray {n}w: {ray_results[n]['images_per_s']:.1f} img/s steady, fit {ray_results[n]['fit_seconds']:.1f} s")

    import ray

    net = cfg.teacher.network
    report = {
        "benchmark": "Ray Train overhead: plain single-process Distiller loop vs TorchTrainer (run_train), "
                     "plus checkpoint upload to local storage and S3",
        "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "device": "cpu", "device_name": device_name(torch.device("cpu")),
        "threads_per_process": a.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "config": {"file": os.path.relpath(a.config, REPO) if a.config.startswith(str(REPO)) else a.config,
                   "method": cfg.method, "stage": a.stage, "arch": net.arch, "net_kwargs": dict(net.kwargs),
                   "resolution": cfg.data.resolution, "channels": cfg.data.channels, "precision": cfg.precision,
                   "batch_total": a.batch, "per_worker": a.per_worker,
                   "rounds": {f"{n}w": a.batch // (a.per_worker * n) for n in sorted({1, *a.workers})},
                   "steps_per_loop": a.steps, "kimg_per_loop": a.steps * a.batch / 1000,
                   "log_every_steps": a.log_every_steps, "teacher_train_kimg": a.teacher_kimg,
                   "extra_overrides": a.overrides},
        "teacher_note": f"built-in digits teacher trained for only {a.teacher_kimg} kimg (a poor teacher): step "
                        "speed does not depend on its quality" + ("" if own_cache else "; SIDA_CACHE was set, so "
                                                                   "a cached teacher may have been reused"),
        "teacher_ready_s": teacher_s,
        "plain_images_per_s": plain["images_per_s"],
        "plain": plain,
    }
    for n, r in ray_results.items():
        report[f"ray_{n}w_images_per_s"] = r["images_per_s"]
        report[f"ray_{n}w_fit_seconds"] = r["fit_seconds"]
        report[f"ray_overhead_{n}w"] = plain["images_per_s"] / r["images_per_s"]
    for n, r in ray_results.items():
        report[f"ray_{n}w"] = r
    if ray_results:
        report["ray_note"] = (
            "ray_overhead_<N>w = plain_images_per_s / ray_<N>w_images_per_s (steady state, same steps after the "
            "first logged row). Each logged row costs a Parquet write on rank 0 and a ray.train.report on every "
            f"worker, here every {a.log_every_steps} step(s) (the digits config logs every 5 kimg, so this "
            "overstates that cost). With 2 workers on "
            f"{os.cpu_count()} core(s) the ratio mixes Ray's overhead with data-parallel speed-up (each worker "
            "does half the batch) and with contention (gloo all-reduce, other processes on the same cores); "
            "fit_seconds includes config, teacher copy, Ray and worker start-up, the final checkpoint and "
            "ray.shutdown.")
    report.update({k: v for k, v in ckpt.items()})
    report["ckpt_note"] = (
        "RunStore.upload_checkpoint of one distill checkpoint folder (state.pt + manifest.json, manifest last), "
        f"median of {a.ckpt_repeats}; local = copy into a folder on this disk (temp file, fsync, rename). "
        + ("S3 = moto_server (tests/s3_server.py) in its own process on 127.0.0.1, objects kept in memory: it "
           "measures the client and protocol overhead (pyarrow S3, HTTP, hashing), not a real network or disk."
           if not a.skip_s3 else "S3 skipped (--skip-s3)."))
    report["total_benchmark_s"] = time.time() - t_start
    return report


def print_json_last(main) -> None:
    """Run ``main()`` with everything written to fd 1 (Ray's log monitor, its subprocesses, tqdm) sent to
    stderr, then print its result as ONE JSON line on the real stdout."""
    import json

    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        result = main()
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    print_json_last(main)
