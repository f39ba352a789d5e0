"""Secrets never leak (issue 18 item 6): S3 keys given in the run config reach every Ray process of a local Ray
(Train controller, workers, scorers, Tune trials) through the environment they inherit, never through a
runtime_env (Ray writes those in clear to every node's runtime_env_agent.log) nor through a pickle that lands in
storage (Tune pickles its RunConfig, storage filesystem included, into tuner.pkl).

One `sida train` (2 workers, live scoring, TensorBoard mirror) and one `sida sweep` (a Tune trial with its scorer)
run as real processes on a real moto S3 with recognisable keys and no AWS_* variables in their environment; then
every byte they left is searched: every object in the bucket, their stdout/stderr, and every file of their Ray
session (logs included). A key of the config reaching the workers is proven by the runs finishing on S3 at all.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from tests.recipes import CONFIG, TINY_TUNE

ROOT = Path(__file__).resolve().parents[1]


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except OSError:  # sockets, files removed while walking
                continue
            hits += [f"{p}: {n.decode()}" for n in needles if n in data]
    return hits


@pytest.mark.slow
def test_config_keys_reach_every_ray_process_and_are_written_nowhere(s3_server, tmp_path):
    key_id, secret = f"AKIASIDA{uuid.uuid4().hex[:12].upper()}", f"sida-secret-{uuid.uuid4().hex}"
    needles = [key_id.encode(), secret.encode()]
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", AWS_EC2_METADATA_DISABLED="true")
    storage = [f"storage.uri=s3://{bucket}/runs", f"storage.endpoint_url={s3_server.endpoint_url}",
               "storage.region=us-east-1", f"storage.access_key_id={key_id}", f"storage.secret_access_key={secret}"]
    sets = [a for s in TINY_TUNE + storage + ["logging.tensorboard=true", "total_kimg=0.128"] for a in ("--set", s)]
    sweep = tmp_path / "one.yaml"
    sweep.write_text(yaml.safe_dump({"name": "one", "base": str(CONFIG), "axes": {"alpha": [1.2]}}))
    outputs, summaries = [], []
    try:
        for argv in (["train", str(CONFIG), "--name", "t", *sets], ["sweep", str(sweep), *sets]):
            proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=tmp_path, env=env,
                                  capture_output=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:].decode(errors="replace")
            outputs.append(proc.stdout + proc.stderr)
            summaries.append(json.loads(proc.stdout.decode().strip().splitlines()[-1]))
        assert summaries[0]["status"] == "finished", summaries[0]
        assert [t["state"] for t in summaries[1]["trials"]] == ["finished"], summaries[1]
        objects = dict(s3_server.objects(bucket))
        # the runs really used the store: checkpoints, scores and TB files of both, Tune's state of the sweep
        assert any(k.startswith("runs/t/leaderboard/") for k in objects)
        assert any(k.startswith("runs/t/tensorboard/") for k in objects)
        assert any(k.startswith("runs/one/") and "/leaderboard/" in k for k in objects)
        assert any(k.endswith("tuner.pkl") for k in objects), sorted(objects)[:50]
        assert [k for k, data in objects.items() if any(n in data for n in needles)] == []
        assert [o for o in outputs if any(n in o for n in needles)] == []
        assert list(ray_tmp.rglob("runtime_env_agent.log")), "the Ray session's logs were not where expected"
        assert files_holding(ray_tmp, needles) == []
        assert files_holding(tmp_path, needles) == []
    finally:
        if os.environ.get("SIDA_KEEP_RAY_TMP") is None:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_pickled_storage_carries_no_keys():
    """What Ray ships to workers and scorers, and what Tune pickles into tuner.pkl in storage, holds no key; the
    driver's own Storage (and its children) keep using the keys it was given."""
    import pickle

    from store.storage import Storage

    s = Storage("s3://b/runs", endpoint_url="http://127.0.0.1:9", access_key_id="AKIAPICKLEME",
                secret_access_key="pickled-secret")
    child = s.child("r1")
    assert child.fs is s.fs and child._keys == s._keys == {"access_key": "AKIAPICKLEME", "secret_key": "pickled-secret"}
    for obj in (s, child, s.ray_storage()[1]):
        data = pickle.dumps(obj)
        assert b"pickled-secret" not in data and b"AKIAPICKLEME" not in data
    assert pickle.loads(pickle.dumps(child))._keys == {}


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_config_keys_with_a_running_cluster_are_refused_before_anything_is_written(command, tmp_path):
    """A running cluster's processes cannot inherit this shell's keys, and a runtime_env would log them: one line,
    exit 2, no run folder, no Ray."""
    sets = ["--set", f"storage.uri={tmp_path / 'runs'}", "--set", "storage.access_key_id=AKIAREFUSED",
            "--set", "storage.secret_access_key=refused-secret"]
    if command == "train":
        argv = ["train", str(CONFIG), *sets]
    else:
        sweep = tmp_path / "s.yaml"
        sweep.write_text(yaml.safe_dump({"name": "s", "base": str(CONFIG), "axes": {"alpha": [1.0]}}))
        argv = ["sweep", str(sweep), *sets]
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv, "--address", "127.0.0.1:1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "storage.secret_access_key" in lines[0] and "storage.env" in lines[0] and "refused-secret" not in lines[0]
    assert not (tmp_path / "runs").exists()
