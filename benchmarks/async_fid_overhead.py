#!/usr/bin/env python
"""What asynchronous scoring costs training: `sida train` with the scorer actors on vs off.
Prints ONE JSON object as the last line of stdout; progress and logs go to stderr.

Both runs are ``pipelines.train.run_train`` on the same config, nets, batch, workers and checkpoint cadence
(a checkpoint every ``--checkpoint-every-kimg``, so scoring is busy for most of the run); only
``metric.enabled`` differs. Training speed is the steady-state images/s between the first and last Parquet
metric row (``ray_overhead.measure_ray``, the same measurement as benchmarks/ray_overhead.py), so Ray's
start-up and the final drain of the scorers are outside the window. Pairs run off/on alternately
(``--pairs``) to spread drift of a shared machine over both arms.

Also reported for the scoring arm: how many leaderboard rows were written while training was still running
(row time before the last metric row), the median seconds per score, and what was skipped.

Example (this machine: 2 cores, no GPU)::

    OMP_NUM_THREADS=1 python benchmarks/async_fid_overhead.py --kimg 24 --checkpoint-every-kimg 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray_overhead  # noqa: E402  (same folder: one steady-state measurement for both benchmarks)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kimg", type=float, default=24.0, help="training images per run, in thousands")
    p.add_argument("--checkpoint-every-kimg", type=float, default=2.0, help="checkpoint (= score) cadence")
    p.add_argument("--num-images", type=int, default=5000, help="metric.num_images: images generated per score")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--scorers", type=int, default=1, help="metric.num_scorers")
    p.add_argument("--pairs", type=int, default=1, help="off/on pairs, alternated")
    p.add_argument("--teacher-kimg", type=float, default=2.0, help="teacher.train.kimg (speed does not depend on it)")
    p.add_argument("--log-every-steps", type=int, default=4, help="a metrics row every this many steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    base = ray_overhead.parse_args([
        "--kimg", str(a.kimg), "--workers", str(a.workers), "--teacher-kimg", str(a.teacher_kimg),
        "--log-every-steps", str(a.log_every_steps), "--skip-s3"])
    return a, base


def log(msg: str) -> None:
    print(f"[async_fid_overhead] {msg}", file=sys.stderr, flush=True)


def measure(a, base, scoring: bool, runs_dir: Path) -> dict:
    from store.run_store import RunStore
    from store.storage import Storage

    base.overrides = [f"checkpoint_every_kimg={ray_overhead.kimg_value(int(a.checkpoint_every_kimg * 1000))}",
                      f"keep_checkpoints={10 ** 6}", f"metric.enabled={str(scoring).lower()}",
                      f"metric.num_images={a.num_images}", f"metric.num_scorers={a.scorers}",
                      f"metric.max_backlog={10 ** 6}", *a.overrides]
    r = ray_overhead.measure_ray(base, a.workers, runs_dir)
    (name,) = [n for n in os.listdir(runs_dir) if not n.startswith(".")]
    store = RunStore(Storage(str(runs_dir)).child(name))
    times = [row["time"] for row in store.read_metrics().select(["time"]).to_pylist()]
    out = {"images_per_s": r["images_per_s"], "fit_seconds": r["fit_seconds"], "window_s": r["window_s"],
           "interval_images_per_s_median": r["interval_images_per_s_median"], "checkpoints": len(r["checkpoints"])}
    if scoring:
        rows = [row for row in store.read_rows() if row["kind"] == "live"]
        out.update(scored=len(rows), skipped=len(store.skipped()),
                   scored_during_training=sum(row["time"] < times[-1] for row in rows),
                   score_seconds_median=statistics.median(row["seconds"] for row in rows) if rows else None,
                   best_value=min((row["value"] for row in rows), default=None))
    shutil.rmtree(runs_dir, ignore_errors=True)
    return out


def main(argv=None) -> dict:
    a, base = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["SIDA_NUM_THREADS"] = "1"
    scratch = Path(tempfile.mkdtemp(prefix="sida-fid-overhead-"))
    os.environ.setdefault("SIDA_CACHE", str(scratch / "cache"))
    t0 = time.time()
    try:
        arms: dict[str, list[dict]] = {"off": [], "on": []}
        for i in range(a.pairs):
            for arm in ("off", "on"):
                log(f"pair {i + 1}/{a.pairs}: scoring {arm}")
                arms[arm].append(measure(a, base, arm == "on", scratch / f"runs-{arm}-{i}"))
                log(f"scoring {arm}: {arms[arm][-1]['images_per_s']:.1f} img/s steady")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    off = statistics.fmean(r["images_per_s"] for r in arms["off"])
    on = statistics.fmean(r["images_per_s"] for r in arms["on"])
    return {
        "benchmark": "training images/s of `sida train` with asynchronous scoring on vs off",
        "cpu_count": os.cpu_count(), "workers": a.workers, "scorers": a.scorers, "kimg_per_run": a.kimg,
        "checkpoint_every_kimg": a.checkpoint_every_kimg, "num_images_per_score": a.num_images, "pairs": a.pairs,
        "images_per_s_scoring_off": off, "images_per_s_scoring_on": on,
        "slowdown_fraction": 1 - on / off,  # 0.05 = training 5 % slower while scorers run
        "runs": arms,
        "note": "steady state between the first and last metric row of each run; scorers run at nice 10 on the "
                "CPU. On a machine whose cores are all taken by the training workers the scorers compete for "
                "them; with a spare core or a GPU for the scorers they should not.",
        "total_benchmark_s": time.time() - t0,
    }


if __name__ == "__main__":
    ray_overhead.print_json_last(main)
