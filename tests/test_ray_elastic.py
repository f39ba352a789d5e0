"""Node loss on a real two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and a second node, each its own
raylet on this machine, one CPU each so that one training worker lands on each node) with elastic workers
(``scaling.num_workers: [1, 2]``): the second node is killed (its Ray workers and raylet, SIGKILL) once a checkpoint
is committed; training goes on with the one worker left, from that checkpoint, and commits its own; the node comes
back and the worker group grows to two again. The run ends at its budget with the same total batch per step
throughout, every metric row exactly once with the worker count that computed it, and both resizes in the events.

Ray's elastic mode counts workers from its AutoscalingCoordinator's view of the nodes, which that actor refreshes
every 20 s; the test asks it to refresh at the two moments the view changes (node dead, node back) so as not to wait.
(A second node started with ``node_ip_address="127.0.0.1"`` left ``ray.init`` waiting for the GCS: the nodes use the
machine's own address.)"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipelines.train import run_train
from store.run_store import RunStore
from store.storage import Storage
from sida_core import checkpoint as ckpt

from tests.ray_head import free_port
from tests.recipes import CONFIG, TINY_RAY as TINY

pytestmark = pytest.mark.slow

# Ray's own timings, shortened for a test: how long a worker group may wait for its placement group (default 60 s;
# a restart decided on a stale view of the cluster waits for a node that is gone), how often the controller polls
# the workers, and how fast the GCS declares a silent node dead (default 5 missed checks of 3 s).
RAY_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 500}


def _proc_table() -> tuple[dict[int, int], dict[int, str]]:
    parent, title = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                title[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                pass
    return parent, title


def _descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every live process below ``pid`` (Linux /proc)."""
    parent, title = _proc_table()
    below, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - below
        below |= frontier
    return {p: title.get(p, "") for p in below}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _kill_node(cluster, node) -> list[int]:
    """SIGKILL the node's processes (what a preempted VM does to them): its Ray workers first, by PID, then its raylet
    and the rest through ``Cluster.remove_node(allow_graceful=False)`` (SIGKILL, no SIGTERM first). Returns the
    worker PIDs killed."""
    workers = [p for p, t in _descendants(node.all_processes["raylet"][0].process.pid).items() if t.startswith("ray::")]
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    cluster.remove_node(node, allow_graceful=False)
    return workers


def _refresh_autoscaling_view() -> bool:
    """Ask Ray's AutoscalingCoordinator (which tells elastic Train how many workers fit) to re-read the cluster's
    nodes now; it does so on its own every 20 s (``TICK_INTERVAL_S``), which would only make this test slower."""
    import ray

    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("sida-test", recompute=True), timeout=30)
    return True


def _committed(store: RunStore) -> list[int]:
    if not store.storage.exists(""):
        return []
    return [int(ckpt.NAME_RE.match(n).group(1)) for n in store.checkpoint_names()
            if store.storage.exists(f"{n}/manifest.json")]


def _starts(store: RunStore) -> list[dict]:
    if not store.storage.exists("events"):
        return []
    return [e for e in store.events() if e["kind"] in ("start", "resume")]


def two_node_cluster(head_cpus: float, **second_node):
    """A head node (``head_cpus`` CPUs, fast node-death detection) and a second node (``second_node``: Cluster.add_node
    arguments) on this machine, the driver (this process) joined to the head; a generator for a fixture's yield."""
    import ray
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # the nodes' processes inherit this process's environment (and its PYTHONPATH)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "_system_config": FAST_NODE_DEATH,
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    cluster.add_node(**second_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node, one CPU each, on loopback; the driver (this process) joins the head."""
    yield from two_node_cluster(1, num_cpus=1)


def train_in_thread(sets: list[str], name: str) -> tuple[threading.Thread, dict]:
    """``sida train`` (run_train) of the test config with ``sets`` in a thread, started: the test's main thread must
    stay free for ``Cluster.add_node`` (signal handlers). ``seen`` gets "out" (its result) or "error" (a traceback)."""
    seen: dict = {}

    def train() -> None:
        try:
            seen["out"] = run_train(str(CONFIG), sets, name=name, log=lambda m: None)
        except BaseException:  # noqa: BLE001 -- reported by the test's main thread
            import traceback
            seen["error"] = traceback.format_exc()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread, seen


def _wait(cond, what: str, deadline: float, every: float = 0.1):
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def test_node_lost_training_goes_on_with_fewer_workers_and_grows_back(two_nodes, tmp_path):
    import ray

    cluster = two_nodes
    runs = tmp_path / "runs"
    steps, batch = 96, 32  # TINY_RAY: batch.total 32 = 2 workers x 16, or 1 worker x 2 rounds of 16
    sets = TINY + [f"storage.uri={runs}", "scaling.num_workers=[1, 2]", "scaling.elastic_resize_monitor_interval_s=1",
                   f"total_kimg={steps * batch / 1000}", f"checkpoint_every_kimg={8 * batch / 1000}",
                   "keep_checkpoints=20", "max_failures=3"]
    store = RunStore(Storage(str(runs)).child("el"))
    thread, seen = train_in_thread(sets, "el")
    deadline = time.monotonic() + 300
    finished = lambda: "out" in seen or "error" in seen  # noqa: E731

    # 1. two workers, one per node, commit a checkpoint; then the second node goes (SIGKILL of all its processes)
    _wait(lambda: finished() or (_starts(store) and _starts(store)[-1]["workers"] == 2 and _committed(store)),
          "a checkpoint from two workers", deadline)
    assert not finished(), seen.get("error")
    node = next(iter(cluster.worker_nodes))
    node_id, raylet = node.node_id, node.all_processes["raylet"][0].process
    on_node = _descendants(raylet.pid)
    train_workers = [p for p, t in on_node.items() if "RayTrainWorker" in t]
    killed_at = max(_committed(store))
    _kill_node(cluster, node)
    assert len(train_workers) == 1, on_node  # one training worker ran on the lost node
    assert raylet.returncode == -signal.SIGKILL
    _wait(lambda: not any(_alive(p) for p in on_node), "the lost node's processes to be gone", deadline)
    _wait(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id), "the node marked dead", deadline)
    _refresh_autoscaling_view()

    # 2. the worker left goes on from the checkpoint and commits one of its own; then capacity returns
    one = _wait(lambda: finished() or [e for e in _starts(store) if e["workers"] == 1], "a restart on one worker",
                deadline)
    assert not finished(), seen.get("error")
    _wait(lambda: finished() or max(_committed(store)) > one[-1]["cur_nimg"], "a checkpoint from one worker", deadline)
    assert not finished(), "the run ended on one worker before the node came back: raise `steps`"
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    _wait(lambda: finished() or (_refresh_autoscaling_view(), _starts(store)[-1]["workers"] == 2)[1],
          "the group to grow back to two workers", deadline, every=2)
    thread.join(max(1.0, deadline - time.monotonic()))
    assert "error" not in seen, seen["error"]

    out, total = seen["out"], steps * batch
    assert out["status"] == "finished" and out["kimg"] == pytest.approx(total / 1000), out
    starts = _starts(store)
    assert [e["workers"] for e in starts] == [2, 1, 2], starts
    shrink, grow = starts[1], starts[2]
    assert shrink["cur_nimg"] >= killed_at and shrink["checkpoint"], starts  # resumed, not restarted from 0
    resizes = [(e["old_workers"], e["new_workers"], e["cur_nimg"]) for e in store.events() if e["kind"] == "resize"]
    assert resizes == [(2, 1, shrink["cur_nimg"]), (1, 2, grow["cur_nimg"])], store.events()
    # every row exactly once, each step one total batch of 32 images whatever the worker count, and the worker
    # count of each row: one between the shrink and the regrowth (from the one-worker checkpoint on, two again)
    rows = store.read_metrics().select(["step", "cur_nimg", "num_workers"]).to_pylist()
    assert [r["cur_nimg"] for r in rows] == list(range(batch, total + 1, batch)), rows
    assert all(r["cur_nimg"] == r["step"] * batch for r in rows), rows
    assert [r["num_workers"] for r in rows] == [1 if shrink["cur_nimg"] < r["cur_nimg"] <= grow["cur_nimg"] else 2
                                                for r in rows], rows
    # the end is what an uninterrupted run reaches: `steps` optimiser steps, `total` images
    state, manifest = store.load_checkpoint(ckpt.checkpoint_name(total))
    assert manifest["cur_nimg"] == total and int(state["progress"]["step"]) == steps
