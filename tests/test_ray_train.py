"""The Ray Train path on a real local Ray: TorchTrainer with 2 CPU workers (gloo DDP), local and S3 storage
(a real moto S3 server process on loopback), resume, and equivalence with the single-process Distiller.

Sizes are tiny (an MLP teacher trained for 1 kimg, batches of 2 x 16 images) so each fit takes seconds of
compute; most of the time is Ray starting workers.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import pytest
import torch

from pipelines.train import run_train
from store.run_store import RunStore
from store.storage import Storage
from schemas.loader import load_run_config
from sida_core.data import load_dataset
from sida_core.training_loop import build_distiller, load_network

from tests.recipes import CONFIG, TINY_RAY as TINY


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray for the module (started after the S3 fixture so its workers inherit the S3 credentials)."""
    import ray

    context = ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield context
    ray.shutdown()


def worker_log_lines(ray_cluster, *needles: str) -> list[str]:
    """Lines of this Ray session's log files (the workers' stderr and Ray Train's worker logs) holding every one
    of ``needles``: what the training workers logged, which ``log_to_driver=False`` keeps out of the test's output."""
    logs = Path(ray_cluster.address_info["session_dir"]) / "logs"
    found = []
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".err", ".out", ".log"):
            found += [ln for ln in path.read_text(errors="replace").splitlines() if all(n in ln for n in needles)]
    return found


def storage_sets(uri: str, endpoint: str | None) -> list[str]:
    return [f"storage.uri={uri}"] + ([f"storage.endpoint_url={endpoint}"] if endpoint else [])


def metric_nimgs(store: RunStore) -> list[int]:
    return store.read_metrics().column("cur_nimg").to_pylist()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_workers_checkpoints_metrics_config_and_resume(where, ray_cluster, tmp_path, s3_bucket, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative local URI must mean the driver's folder, not the workers' cwd
    uri, endpoint = ("runs", None) if where == "local" else (s3_bucket.uri + "/runs", s3_bucket.endpoint_url)
    sets = TINY + storage_sets(uri, endpoint) + ["total_kimg=0.128", "checkpoint_every_kimg=0.064", "keep_checkpoints=1"]
    # one writer per run: a second `sida train --resume` started while this one trains is refused (store.lease)
    second = threading.Thread(target=_second_writer, args=(Storage(uri, endpoint_url=endpoint).child("r1"), endpoint,
                                                           tmp_path, (refused := {})), daemon=True)
    second.start()
    out = run_train(str(CONFIG), sets, workers=2, name="r1", log=lambda m: None)
    second.join(120)
    assert refused.get("rc") == 2 and len(refused["errors"]) == 1, refused
    assert f"is being written by {socket.gethostname()}:{os.getpid()}" in refused["errors"][0], refused
    assert refused["during"], "the second writer ran after the first had finished: the test proved nothing"
    assert out["status"] == "finished" and out["kimg"] == pytest.approx(0.128)
    assert out["checkpoints"] == ["ckpt-000000000128"]  # keep_checkpoints=1 rotated ckpt-64 away
    store = RunStore(Storage(uri, endpoint_url=endpoint).child("r1"))
    assert metric_nimgs(store) == [32, 64, 96, 128]
    cfg = store.read_config()
    assert cfg["scaling"]["num_workers"] == 2 and cfg["total_kimg"] == 0.128
    state, manifest = store.load_checkpoint("ckpt-000000000128")
    assert manifest["cur_nimg"] == 128 and int(state["progress"]["step"]) == 4
    assert {"generator", "generator_ema", "fake_score", "opt_G", "opt_psi", "scaler_G", "scaler_psi"} <= set(state)
    if where == "s3":  # an independent client sees the objects at the expected keys
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket.name, Prefix="runs/r1/")["Contents"]}
        assert {"runs/r1/config.json", "runs/r1/status.json", "runs/r1/teacher/manifest.json",
                "runs/r1/ckpt-000000000128/state.pt", "runs/r1/ckpt-000000000128/manifest.json",
                "runs/r1/metrics/part-000000000096.parquet"} <= keys

    # resume the finished run with a longer schedule, on one worker (same total batch: same numbers)
    rows_before = store.read_metrics().to_pylist()
    logs: list[str] = []
    out2 = run_train(resume=store.uri, overrides=["total_kimg=0.192"], workers=1, endpoint_url=endpoint, log=logs.append)
    assert out2["status"] == "finished" and out2["kimg"] == pytest.approx(0.192)
    rows = store.read_metrics().to_pylist()
    assert [r["cur_nimg"] for r in rows] == [32, 64, 96, 128, 160, 192]  # no duplicated, no lost rows
    assert rows[:4] == rows_before  # the resume rewrote none of the first run's rows
    assert [r["num_workers"] for r in rows] == [2, 2, 2, 2, 1, 1]
    resumes = [e for e in store.events() if e["kind"] == "resume"]
    assert [(e["checkpoint"], e["cur_nimg"], e["workers"]) for e in resumes] == [("ckpt-000000000128", 128, 1)]
    state, manifest = store.load_checkpoint(out2["checkpoints"][-1])
    assert manifest["cur_nimg"] == 192 and int(state["progress"]["step"]) == 6
    # The same numbers: 4 steps on 2 workers x 16 images then 2 on 1 worker x 2 rounds of 16 equal one process
    # doing all 6 steps in 2 rounds of 16 (micro-batch k draws the same numbers on worker k or in round k), to the
    # rounding the 2-worker equivalence test allows; the one-worker rows average both rounds, as that process does.
    stats: list[dict] = []
    state_ref = _single_process_reference(load_run_config(CONFIG, sets + ["scaling.num_workers=2"]), store, 6, stats)
    for key in ("generator", "generator_ema", "fake_score"):
        for name, ref in state_ref[key].items():
            torch.testing.assert_close(state[key][name], ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}.{name}: {m}")
    for row, ref_stats in zip(rows[4:], stats[4:]):
        assert (row["step"], row["stage"]) == (ref_stats["step"], ref_stats["stage"])
        for k in ("loss_psi", "loss_G", "loss_sid", "loss_adv_theta", "loss_adv_psi", "d_real", "d_fake"):
            want = ref_stats.get(k)
            assert (row[k] is None) == (want is None) and (want is None or row[k] == pytest.approx(
                float(want), rel=1e-4, abs=1e-6)), (row["cur_nimg"], k, row[k], want)


def _second_writer(run: Storage, endpoint: str | None, cwd: Path, result: dict) -> None:
    """Once the run holds its lease and has its config, try `sida train --resume` on it from another process."""
    deadline = time.monotonic() + 300
    while not (run.exists("lease.json") and run.exists("config.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    argv = [sys.executable, "-m", "pipelines.cli", "train", "--resume", run.uri,
            *(["--endpoint-url", endpoint] if endpoint else [])]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    result.update(rc=proc.returncode, errors=[ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")],
                  during=run.exists("lease.json"), stderr=proc.stderr[-2000:])


def _single_process_reference(cfg_2w, store: RunStore, steps: int, stats: list | None = None):
    """The same run in one process: per-worker batch b, total 2b, so 2 accumulation rounds with the micro-batch
    indices 0, 1 that the 2 workers use; the adversarial means are per round of b, gradients averaged.
    ``stats``: a list to append each step's numbers to (Distiller.step)."""
    cfg = cfg_2w.model_copy(update={"scaling": cfg_2w.scaling.model_copy(update={"num_workers": 1})})
    train_set, _ = load_dataset(cfg.data)
    teacher_dir = store.fetch_checkpoint("teacher", Path(tempfile.mkdtemp(prefix="teacher-")))
    teacher, _ = load_network(teacher_dir, "net")
    d = build_distiller(cfg, teacher, train_set, torch.device("cpu"))
    assert d.rounds == 2
    for _ in range(steps):
        step_stats = d.step()
        if stats is not None:
            stats.append(step_stats)
    return d.state_dict()


@pytest.mark.parametrize("method", ["sid", "sida"])
def test_two_workers_equal_one_process_with_accumulation(method, ray_cluster, tmp_path):
    uri = str(tmp_path / "runs")
    # 3 steps: fake-score only, SiD, then SiDA (for method sida)
    sets = TINY + [f"storage.uri={uri}", f"method={method}", "total_kimg=0.096", "checkpoint_every_kimg=0.096"]
    out = run_train(str(CONFIG), sets, workers=2, name="eq", log=lambda m: None)
    assert out["status"] == "finished"
    store = RunStore(Storage(uri).child("eq"))
    # two workers did run: the world size Ray Train gave the workers, as they recorded it
    assert [r["num_workers"] for r in store.read_metrics().to_pylist()] == [2, 2, 2]
    assert [(e["kind"], e["workers"]) for e in store.events() if e["kind"] == "start"] == [("start", 2)]
    state_ray, _ = store.load_checkpoint("ckpt-000000000096")
    cfg = load_run_config(CONFIG, sets + ["scaling.num_workers=2"])
    state_ref = _single_process_reference(cfg, store, steps=3)
    for key in ("generator", "generator_ema", "fake_score"):
        for name, ref in state_ref[key].items():
            torch.testing.assert_close(state_ray[key][name], ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}.{name}: {m}")
    # and the run did move the generator away from the teacher (else the comparison proves nothing)
    teacher, _ = load_network(store.fetch_checkpoint("teacher", Path(uri)), "net")
    moved = max((state_ray["generator"][n] - p).abs().max().item() for n, p in teacher.state_dict().items())
    assert moved > 1e-4


def test_sida_distill_and_sida_train_write_the_same_rows_and_checkpoints(ray_cluster, tmp_path):
    """One loop, two hosts: for one worker and one config, `sida distill` (no Ray) and `sida train` (Ray Train,
    DDP of one) write metric rows at the same kimg with the same losses, and checkpoints with the same weights."""
    from pipelines.distill import run_distill, run_store_of
    from sida_core.determinism import cpu_threads

    uri = str(tmp_path / "runs")
    sets = TINY + [f"storage.uri={uri}", "total_kimg=0.096", "checkpoint_every_kimg=0.064"]
    out = run_train(str(CONFIG), sets, workers=1, name="ray", log=lambda m: None)
    assert out["status"] == "finished"
    ray_store = RunStore(Storage(uri).child("ray"))
    cfg = load_run_config(CONFIG, sets + ["scaling.num_workers=1"])
    with cpu_threads(1):  # the Ray worker's thread count (scaling.cpus_per_worker=1): same kernels, same sums
        local = run_distill(cfg, run_store_of(cfg, f"{uri}/local"), progress=False, log=lambda m: None)
    local_store = RunStore(Storage(uri).child("local"))

    ray_rows, local_rows = ray_store.read_metrics().to_pylist(), local_store.read_metrics().to_pylist()
    assert [r["cur_nimg"] for r in ray_rows] == [r["cur_nimg"] for r in local_rows] == [32, 64, 96]
    for a, b in zip(ray_rows, local_rows):
        assert (a["step"], a["stage"], a["num_workers"]) == (b["step"], b["stage"], b["num_workers"])
        for k in ("loss_psi", "loss_G", "loss_sid", "loss_adv_theta", "loss_adv_psi", "d_real", "d_fake"):
            assert (a[k] is None) == (b[k] is None) and (a[k] is None or a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7)), k
    assert ray_store.checkpoint_names() == local_store.checkpoint_names() == ["ckpt-000000000064", "ckpt-000000000096"]
    for name in ray_store.checkpoint_names():
        (sa, ma), (sb, mb) = ray_store.load_checkpoint(name), local_store.load_checkpoint(name)
        assert {k: ma[k] for k in ("kind", "cur_nimg", "step", "method", "network")} == \
               {k: mb[k] for k in ("kind", "cur_nimg", "step", "method", "network")}
        for key in ("generator", "generator_ema", "fake_score"):
            for pname, ref in sb[key].items():
                torch.testing.assert_close(sa[key][pname], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}.{pname}: {m}")
    assert [e["kind"] for e in ray_store.events()] == [e["kind"] for e in local_store.events()] == ["start", "finished"]
    assert ray_store.read_status()["state"] == local_store.read_status()["state"] == "finished"
    assert local["checkpoint"] == local_store.storage.uri_of("ckpt-000000000096")


def _pause_when(bucket, key_prefix: str, seconds: float | None, started: dict) -> None:
    """Background: once an object under ``key_prefix`` exists, SIGSTOP the S3 server for ``seconds``
    (None: until the test resumes it)."""
    import threading
    import time

    s3 = boto3.client("s3", endpoint_url=bucket.endpoint_url, region_name="us-east-1")

    def run():
        deadline = time.time() + 300
        while time.time() < deadline:
            found = s3.list_objects_v2(Bucket=bucket.name, Prefix=key_prefix).get("KeyCount", 0)
            if found:
                done = s3.list_objects_v2(Bucket=bucket.name, Prefix=key_prefix.rsplit("/", 2)[0] + "/status.json")
                started["run_was_running"] = not done.get("KeyCount", 0)
                bucket.server.pause()
                started["paused_at"] = time.time()
                if seconds is not None:
                    time.sleep(seconds)
                    bucket.server.resume()
                return
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_s3_outage_shorter_than_the_retry_budget_is_survived(ray_cluster, s3_bucket):
    uri = s3_bucket.uri + "/runs"
    sets = TINY + storage_sets(uri, s3_bucket.endpoint_url) + [
        "total_kimg=0.384", "checkpoint_every_kimg=0.128", "storage.retry_max_backoff_s=2", "storage.request_timeout_s=3"]
    info: dict = {}
    # A request to the frozen server fails about 7 s after storage.request_timeout_s (curl's stall detector: ~10 s
    # here, measured against moto_server); 15 s outlasts one attempt by 5 s and ends about 5 s before the retry would
    # time out too: the first request fails, its retry succeeds (6 attempts allowed).
    t = _pause_when(s3_bucket, "runs/o1/metrics/part-000000000064", 15.0, info)
    try:
        out = run_train(str(CONFIG), sets, workers=2, name="o1", log=lambda m: None)
    finally:
        t.join(timeout=30)
        s3_bucket.server.resume()
    assert info.get("run_was_running"), "the outage must happen while the run is going"
    assert out["status"] == "finished" and out["kimg"] == pytest.approx(0.384)
    store = RunStore(Storage(uri, endpoint_url=s3_bucket.endpoint_url).child("o1"))
    assert store.read_metrics().column("cur_nimg").to_pylist() == list(range(32, 385, 32))
    for name in store.checkpoint_names():
        store.load_checkpoint(name)  # verifies the hashes
    # survived by retrying (store.storage logs each retry), not by the outage being shorter than one request
    retries = worker_log_lines(ray_cluster, f"bucket '{s3_bucket.name}'", "'runs/o1/", "failed (attempt 1/6), retrying")
    assert retries, "no storage retry was logged: the outage did not outlast a request"
    assert not [e for e in store.events() if e["kind"] == "resume"], "survived by a restart, not by the retry"


def test_s3_outage_past_the_retry_budget_fails_clearly_and_leaves_nothing_corrupt(ray_cluster, s3_bucket):
    import time

    from pipelines.train import TrainingError

    uri = s3_bucket.uri + "/runs"
    sets = TINY + storage_sets(uri, s3_bucket.endpoint_url) + [
        "total_kimg=3.2", "checkpoint_every_kimg=0.064", "max_failures=0", "storage.retry_attempts=2",
        "storage.retry_max_backoff_s=0.5", "storage.request_timeout_s=1", "storage.connect_timeout_s=1"]
    info: dict = {}
    t = _pause_when(s3_bucket, "runs/o2/ckpt-000000000064/manifest.json", None, info)
    try:
        with pytest.raises(TrainingError) as err:
            run_train(str(CONFIG), sets, workers=2, name="o2", log=lambda m: None)
        failed_after = time.time() - info["paused_at"]
    finally:
        t.join(timeout=30)
        s3_bucket.server.resume()
    msg = str(err.value)
    assert "\n" not in msg and "runs/o2" in msg and "object store" in msg and s3_bucket.endpoint_url in msg, msg
    assert failed_after < 240, failed_after
    # nothing half-written is read back: every checkpoint either verifies or has no manifest (never committed)
    store = RunStore(Storage(uri, endpoint_url=s3_bucket.endpoint_url).child("o2"))
    for name in store.checkpoint_names():
        if store.storage.exists(f"{name}/manifest.json"):
            store.load_checkpoint(name)
    state, manifest, _ = store.load_latest_valid()
    assert manifest["cur_nimg"] >= 64
    rows = store.read_metrics().column("cur_nimg").to_pylist()
    assert rows == list(range(32, rows[-1] + 1, 32))


def test_two_workers_stream_a_prepared_s3_dataset_exactly(ray_cluster, tmp_path, s3_bucket):
    """SiDA on a dataset prepared into S3: each worker stages it once into the node cache and reads its real
    micro-batches from the shards; the result equals one process with 2 rounds on the in-memory source."""
    import numpy as np

    from ray_jobs.datasets import prepare_dataset
    from sida_core.data import load_digits_arrays
    from sida_core.training_loop import get_teacher

    digits, labels = load_digits_arrays()
    src = tmp_path / "digits255.npz"
    np.savez(src, images=np.rint(digits.astype(np.float64) * 255 / 16).astype(np.uint8), labels=labels)
    data_uri = s3_bucket.uri + "/datasets/digits255"
    prepare_dataset(str(src), data_uri, shard_size=500, endpoint_url=s3_bucket.endpoint_url, progress=False,
                    log=lambda m: None)
    teacher_cfg = load_run_config(CONFIG, TINY)
    _, teacher_dir = get_teacher(teacher_cfg, load_dataset(teacher_cfg.data)[0], torch.device("cpu"), lambda m: None)
    runs = s3_bucket.uri + "/runs"
    sets = TINY + storage_sets(runs, s3_bucket.endpoint_url) + [
        "method=sida", "total_kimg=0.096", "checkpoint_every_kimg=0.096", f"teacher.path={teacher_dir}",
        "data.kind=prepared", f"data.path={data_uri}", "data.xflip=true", "stages.fake_score_only_kimg=0",
        "stages.sid_until_kimg=0"]
    out = run_train(str(CONFIG), sets, workers=2, name="prep", log=lambda m: None)
    assert out["status"] == "finished"
    store = RunStore(Storage(runs, endpoint_url=s3_bucket.endpoint_url).child("prep"))
    state_ray, _ = store.load_checkpoint("ckpt-000000000096")
    staged = list((Path(os.environ["SIDA_CACHE"]) / "datasets").glob("*/manifest.json"))
    assert len(staged) == 1  # one copy on this node, shared by the driver and both workers

    cfg = load_run_config(CONFIG, [s for s in sets if not s.startswith("data.")] + [
        "data.kind=npz", f"data.path={src}", "data.xflip=true", "scaling.num_workers=2"])
    state_ref = _single_process_reference(cfg, store, steps=3)
    for key in ("generator", "fake_score"):
        for name, ref in state_ref[key].items():
            torch.testing.assert_close(state_ray[key][name], ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}.{name}: {m}")
