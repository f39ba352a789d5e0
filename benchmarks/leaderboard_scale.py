"""How long `sida leaderboard ROOT --by run` takes over a large object-storage root, before and after compaction.

Writes RUNS x CHECKPOINTS x SEEDS synthetic leaderboard rows (real ``RunStore.write_row``: one Parquet object per
row, as the scorers write them; every run ended) to a bucket of a real S3-API server (``moto_server`` on loopback,
started here unless ``--endpoint-url`` is given), then times, each as its own ``sida`` process (what a user waits
for, Python start-up included):

- ``before_s``: ``sida leaderboard ROOT --by run --json`` over the one-object-per-row layout;
- ``compact_s``: ``sida leaderboard ROOT --compact --top 1`` (one Parquet part per run, the row objects deleted in
  batches, the root index written: store/leaderboard_index.py, then one read);
- ``after_s``: ``sida leaderboard ROOT --by run --json`` again (through the root index); its output must equal the
  first one;
- ``dirty_after_s``: the same after one new row in one run (that run read itself, the others from the index).

Prints one JSON line. The issue's size and target: 500 runs x 20 checkpoints x 10 seeds = 100,000 rows, after
compaction under 5 s on the 2-core CPU: ``.venv/bin/python benchmarks/leaderboard_scale.py`` (defaults).
CI runs it small (tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_rows(uri: str, endpoint_url: str, runs: int, checkpoints: int, seeds: int, *, threads: int = 16,
               progress: bool = True, first_seed: int = 0, notify_index: bool = False, parts: bool = False) -> int:
    """``runs`` ended runs under ``uri``, each with ``checkpoints`` x ``seeds`` live scores; returns rows written.
    ``notify_index``: the per-row check for a root index (a listing of the run's leaderboard/.indexed/), skipped
    while filling the fresh bucket, where no index exists yet: moto scans the whole bucket per listing, which would
    make the setup quadratic. The one-new-row step does it, as scorers do. ``parts``: each run's rows written as the
    one compacted part a compaction leaves (one object per run: a fast setup for the after-compaction read)."""
    from schemas.leaderboard import LeaderboardRow
    from store.run_store import RunState, RunStore
    from store.storage import Storage

    root = Storage(uri, endpoint_url=endpoint_url)

    def one_run(i: int) -> int:
        rng = random.Random(i)
        name = f"run-{i:04d}"
        store = RunStore(root.child(name))
        store.write_config({"name": name, "method": "sida", "synthetic": True})
        level = rng.uniform(2.0, 8.0)
        rows = []
        for k in range(1, checkpoints + 1):
            nimg = k * 10_000
            ck = f"ckpt-{nimg:012d}"
            for seed in range(first_seed, first_seed + seeds):
                rows.append(LeaderboardRow(
                    run=name, run_uri=store.uri, config_summary="synthetic", method="sida", alpha=1.2,
                    lambda_sid=100.0, lambda_adv_theta=0.01, lambda_adv_psi=1.0, lr_theta=1e-4, lr_psi=1e-4,
                    checkpoint=ck, checkpoint_uri=store.storage.uri_of(ck), checkpoint_hash=f"{i:04d}{k:04d}",
                    kimg=nimg / 1000, cur_nimg=nimg, metric="fd_digits", value=level * (1 + 20 / k) * rng.uniform(0.9, 1.1),
                    num_images=5000, seed=seed, reference="synthetic", extractor_id="synthetic", time=1.0e9 + i))
        if parts:
            import pyarrow as pa

            from schemas.leaderboard import parquet_schema
            from store.run_store import COMPACTED_PREFIX

            schema, dumped = parquet_schema(), [r.model_dump() for r in rows]
            store.storage.write_parquet(f"leaderboard/{COMPACTED_PREFIX}{time.time_ns():020d}-bench.parquet",
                                        pa.table({k: [r[k] for r in dumped] for k in schema.names}, schema=schema))
        else:
            for row in rows:
                store.write_row(row, notify_index=notify_index)
        store.record_end(RunState.FINISHED, cur_nimg=checkpoints * 10_000)
        return checkpoints * seeds

    done = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for i, n in enumerate(pool.map(one_run, range(runs)), 1):
            done += n
            if progress and (i % max(1, runs // 10) == 0 or i == runs):
                print(f"wrote {done:,} of {runs * checkpoints * seeds:,} rows ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    return done


def timed_cli(*args: str, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"sida {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return seconds, p.stdout


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=16, help="writers of the synthetic rows")
    ap.add_argument("--endpoint-url", default=None, help="an S3-API server to use (default: start moto_server here)")
    ap.add_argument("--parts", action="store_true",
                    help="write each run's rows as one compacted part (the layout --compact leaves) instead of one object "
                         "per row: minutes instead of an hour; before_s is then a read of compacted parts without the "
                         "root index, and compact_s mostly the index")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import CREDENTIALS, start_moto_server

    os.environ.update({k: os.environ.get(k, v) for k, v in CREDENTIALS.items()})
    server = None if a.endpoint_url else start_moto_server()
    endpoint = a.endpoint_url or server.endpoint_url  # type: ignore[union-attr]
    try:
        import boto3

        bucket = f"lb-scale-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
                     ).create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/runs"
        t0 = time.perf_counter()
        rows = write_rows(uri, endpoint, a.runs, a.checkpoints, a.seeds, threads=a.threads, parts=a.parts)
        write_s = time.perf_counter() - t0
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": str(ROOT)}
        before_s, before = timed_cli("leaderboard", uri, "--by", "run", "--json", env=env)
        compact_s, _ = timed_cli("leaderboard", uri, "--compact", "--by", "run", "--top", "1", "--json", env=env)
        after_s, after = timed_cli("leaderboard", uri, "--by", "run", "--json", env=env)
        # a second compaction finds nothing to do
        again_s, _ = timed_cli("leaderboard", uri, "--compact", "--top", "1", "--json", env=env)
        objects = sum(1 for _ in _keys(boto3.client("s3", endpoint_url=endpoint), bucket, "runs/"))
        write_rows(uri, endpoint, 1, 1, 1, progress=False, first_seed=a.seeds, notify_index=True)  # run-0000: one more
        dirty_s, dirty = timed_cli("leaderboard", uri, "--by", "run", "--json", env=env)
        if len(json.loads(dirty)) != len(json.loads(after)):
            raise SystemExit("the leaderboard after one new row lost or gained runs")
        shown, was = json.loads(after), json.loads(before)
        if was != shown:
            diff = next(((i, a, b) for i, (a, b) in enumerate(zip(was, shown)) if a != b), None)
            detail = (f"{len(was)} rows before, {len(shown)} after" if diff is None else
                      f"first difference at rank {diff[0]}: " + ", ".join(
                          f"{k}: {diff[1].get(k)!r} -> {diff[2].get(k)!r}" for k in sorted(set(diff[1]) | set(diff[2]))
                          if diff[1].get(k) != diff[2].get(k)))
            raise SystemExit(f"the leaderboard after compaction differs from the one before it ({detail})")
    finally:
        if server is not None:
            server.stop()
    out = {"runs": a.runs, "checkpoints": a.checkpoints, "seeds": a.seeds, "rows": rows, "runs_shown": len(shown),
           "layout": "compacted parts" if a.parts else "one object per row",
           "write_s": round(write_s, 1), "before_s": round(before_s, 2), "compact_s": round(compact_s, 2),
           "after_s": round(after_s, 2), "second_compact_s": round(again_s, 2),
           "dirty_after_s": round(dirty_s, 2),
           "speedup": round(before_s / after_s, 1), "objects_after": objects, "same_leaderboard": True,
           "target_after_s": 5.0, "cpus": os.cpu_count()}
    print(json.dumps(out))
    return out


def _keys(client, bucket: str, prefix: str):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            yield o["Key"]


if __name__ == "__main__":
    main()
