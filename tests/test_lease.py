"""One writer per run (issue 18 items 2 and 5): store.lease on a local folder and on a real S3 (moto) server.

The end-to-end case (a second `sida train --resume` while the first trains) is in tests/test_ray_train.py, which
has the Ray runs; here: the lease's own rules, races between processes-to-be (threads with their own leases),
crash leftovers, and `sida distill` refusing a held run without writing anything.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from store.lease import LEASE_FILE, LeaseError, RunLease, clean_leftovers, remove_dead_lease
from store.storage import Storage
from tests.recipes import CONFIG, TINY_DISTILL


@pytest.fixture(params=["local", "s3"])
def run_storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "runs")).child("r")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"{bucket.uri}/runs", endpoint_url=bucket.endpoint_url).child("r")


def fake_holder(storage: Storage, *, host: str, pid: int, age_s: float, ttl_s: float = 60.0) -> None:
    now = time.time()
    storage.write_json(LEASE_FILE, {"owner": f"{host}:{pid}", "host": host, "pid": pid, "token": "theirs",
                                    "started": now - age_s - 5, "heartbeat": now - age_s, "ttl_s": ttl_s})


def test_a_live_holder_is_refused_and_a_released_lease_is_free(run_storage):
    first = RunLease(run_storage, settle_s=0.2).acquire()
    assert run_storage.read_json(LEASE_FILE)["owner"] == f"{socket.gethostname()}:{os.getpid()}"
    with pytest.raises(LeaseError) as err:
        RunLease(run_storage, settle_s=0.2).acquire()
    msg = str(err.value)
    assert "\n" not in msg and run_storage.uri in msg and first.owner in msg and "--steal-lease" in msg
    first.release()
    assert not run_storage.exists(LEASE_FILE)
    with RunLease(run_storage, settle_s=0.2) as second:
        assert run_storage.read_json(LEASE_FILE)["token"] == second.token
    assert not run_storage.exists(LEASE_FILE)


def test_stale_leases_are_taken_over_with_a_warning(run_storage):
    logs: list[str] = []
    fake_holder(run_storage, host="node-gone", pid=4242, age_s=120)  # silent past its ttl
    with RunLease(run_storage, settle_s=0.2, log=logs.append) as lease:
        assert run_storage.read_json(LEASE_FILE)["token"] == lease.token
    assert len(logs) == 1 and "stale lease of node-gone:4242" in logs[0]
    # a holder on this host whose process is gone is stale at once, heartbeat or not
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fake_holder(run_storage, host=socket.gethostname(), pid=int(dead.stdout), age_s=0)
    with RunLease(run_storage, settle_s=0.2):
        pass
    # a live one on another host is refused until it is stale, unless stolen
    fake_holder(run_storage, host="node-alive", pid=1, age_s=1)
    with pytest.raises(LeaseError, match="node-alive:1"):
        RunLease(run_storage, settle_s=0.2).acquire()
    logs.clear()
    with RunLease(run_storage, settle_s=0.2, log=logs.append).acquire(steal=True):
        pass
    assert "live lease of node-alive:1" in logs[0]


def test_a_dead_holders_lease_is_removed_a_live_strangers_is_kept(tmp_path):
    """What a sweep driver does after its Tune experiment (pipelines.sweep.remove_dead_leases)."""
    storage = Storage(str(tmp_path / "runs")).child("r")
    assert remove_dead_lease(storage, token="mine") is None  # no lease: nothing to do
    fake_holder(storage, host="node-alive", pid=1, age_s=1)  # live, on another node, not the caller's
    assert remove_dead_lease(storage, token="mine") is None and storage.exists(LEASE_FILE)
    assert remove_dead_lease(storage, token="theirs")["owner"] == "node-alive:1"  # the caller knows it ended
    assert not storage.exists(LEASE_FILE)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fake_holder(storage, host=socket.gethostname(), pid=int(dead.stdout), age_s=0)  # this host, process gone
    assert remove_dead_lease(storage)["pid"] == int(dead.stdout) and not storage.exists(LEASE_FILE)
    with RunLease(storage, settle_s=0.2, token="held") as lease:  # a live holder in this process: kept
        assert remove_dead_lease(storage) is None and storage.read_json(LEASE_FILE)["token"] == lease.token == "held"


def test_waiting_for_a_holder_to_go_stale(run_storage):
    fake_holder(run_storage, host="node-gone", pid=7, age_s=0, ttl_s=1.0)
    t0 = time.monotonic()
    with RunLease(run_storage, settle_s=0.2).acquire(wait_s=10):
        pass
    assert 0.5 < time.monotonic() - t0 < 8


def test_simultaneous_takers_exactly_one_wins(run_storage):
    n = 4
    barrier, won, refused = threading.Barrier(n), [], []

    def take():
        lease = RunLease(run_storage, settle_s=0.5)
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == n - 1, (won, refused)
    assert run_storage.read_json(LEASE_FILE)["token"] == won[0].token
    won[0].release()


def test_heartbeat_renews_and_a_lost_lease_is_noticed(run_storage):
    logs: list[str] = []
    lease = RunLease(run_storage, ttl_s=0.6, settle_s=0.2, log=logs.append).acquire()
    try:
        first = run_storage.read_json(LEASE_FILE)["heartbeat"]
        time.sleep(0.7)
        assert run_storage.read_json(LEASE_FILE)["heartbeat"] > first
        thief = RunLease(run_storage, ttl_s=60, settle_s=0.2).acquire(steal=True)
        time.sleep(0.7)
        assert lease.lost and thief.owner in lease.lost and any("no longer owns" in m for m in logs)
        lease.release()
        assert run_storage.read_json(LEASE_FILE)["token"] == thief.token  # a lost lease is not deleted
        thief.release()
    finally:
        lease.release()


def test_crash_leftovers_are_removed_and_a_checkpoint_renamed_aside_is_put_back(tmp_path):
    run = tmp_path / "r"
    (run / "ckpt-000000000064").mkdir(parents=True)
    (run / "ckpt-000000000064" / "state.pt").write_bytes(b"new")
    (run / ".ckpt-000000000064.old-1a2b3c4d").mkdir()          # superseded: the new one is in place
    (run / ".ckpt-000000000128.old-5e6f7a8b").mkdir()          # crashed between the two renames: put back
    (run / ".ckpt-000000000128.old-5e6f7a8b" / "state.pt").write_bytes(b"previous")
    (run / ".ckpt-000000000128.tmp-5e6f7a8b").mkdir()          # the unfinished replacement
    (run / "metrics").mkdir()
    (run / "metrics" / ".part-64.parquet.0badc0de.tmp").write_bytes(b"half")
    (run / ".hidden-but-ours.json").write_text("{}")           # not a leftover pattern: untouched
    removed = clean_leftovers(Storage(str(run)))
    assert removed == sorted([".ckpt-000000000064.old-1a2b3c4d", ".ckpt-000000000128.old-5e6f7a8b",
                              ".ckpt-000000000128.tmp-5e6f7a8b", "metrics/.part-64.parquet.0badc0de.tmp"])
    assert sorted(p.name for p in run.iterdir()) == [".hidden-but-ours.json", "ckpt-000000000064",
                                                     "ckpt-000000000128", "metrics"]
    assert (run / "ckpt-000000000128" / "state.pt").read_bytes() == b"previous"
    assert list((run / "metrics").iterdir()) == []


def test_taking_a_stale_lease_cleans_leftovers_but_a_live_holder_keeps_them(tmp_path):
    storage = Storage(str(tmp_path / "r"))
    fake_holder(storage, host="node-alive", pid=1, age_s=1)
    (tmp_path / "r" / ".x.json.0badc0de.tmp").write_text("half")
    with pytest.raises(LeaseError):
        RunLease(storage).acquire()
    assert (tmp_path / "r" / ".x.json.0badc0de.tmp").exists()
    fake_holder(storage, host="node-gone", pid=1, age_s=600)
    logs: list[str] = []
    with RunLease(storage, log=logs.append):
        assert not (tmp_path / "r" / ".x.json.0badc0de.tmp").exists()
    assert any(".x.json.0badc0de.tmp" in m for m in logs)


def test_sida_distill_refuses_a_held_run_in_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "runs" / "held"
    storage = Storage(str(run))
    fake_holder(storage, host=socket.gethostname(), pid=os.getpid(), age_s=0)  # this test process: alive
    before = sorted(p.name for p in run.iterdir())
    argv = [sys.executable, "-m", "pipelines.cli", "distill", str(CONFIG), "--run-dir", str(run), "--quiet",
            *[a for s in TINY_DISTILL for a in ("--set", s)]]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SIDA_CACHE": os.environ.get("SIDA_CACHE", str(tmp_path / "cache"))})
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"is being written by {socket.gethostname()}:{os.getpid()}" in lines[0] and "--steal-lease" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == before == [LEASE_FILE]
    assert json.loads((run / LEASE_FILE).read_text())["token"] == "theirs"
