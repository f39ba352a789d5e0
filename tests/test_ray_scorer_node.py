"""A scorer on a node that is lost (issue 18, item 1): a real two-node Ray cluster (``ray.cluster_utils.Cluster``), the
training worker on the head, the scorer actor kept on the second node by a custom resource (``metric.scorer_resources:
{scoring: 1}``, the second node started with it and no CPUs). The second node is SIGKILLed (its Ray workers, then its
raylet) once a checkpoint is scored; training goes on, the coordinator waits for Ray to restart the scorer (it
needs the ``scoring`` resource, so it waits for a node that has one), the node comes back, the scorer restarts there
and the remaining checkpoints are scored. The run finishes with every committed checkpoint scored exactly once or
skipped with its reason, and the final one scored. (Training on the head may end before the scorer is back: the
coordinator's drain waits for it, up to metric.drain_timeout_s.)"""
from __future__ import annotations

import time

import pytest

from store.run_store import RunStore
from store.storage import Storage

from tests.recipes import TINY_RAY as TINY
from tests.test_ray_elastic import _alive, _committed, _descendants, _kill_node, _wait, train_in_thread, two_node_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head_and_scoring_node():
    """A head with 2 CPUs (training) and a second node with no CPU and the custom resource ``scoring`` (the scorer)."""
    yield from two_node_cluster(2, num_cpus=0, resources={"scoring": 1})


def _scorer_pids(node) -> list[int]:
    return [p for p, t in _descendants(node.all_processes["raylet"][0].process.pid).items()
            if t.startswith("ray::CheckpointScorer")]


def test_scorer_node_lost_scoring_resumes_when_it_returns(head_and_scoring_node, tmp_path):
    import ray

    cluster = head_and_scoring_node
    runs = tmp_path / "runs"
    steps, batch = 64, 32
    sets = TINY + [f"storage.uri={runs}", "scaling.num_workers=1", f"total_kimg={steps * batch / 1000}",
                   f"checkpoint_every_kimg={8 * batch / 1000}", "keep_checkpoints=20", "metric.enabled=true",
                   "metric.num_images=64", "metric.batch_size=64", "metric.gallery=0", "metric.cpus_per_scorer=0",
                   "metric.scorer_resources={scoring: 1}", "metric.max_backlog=20", "metric.drain_timeout_s=240"]
    store = RunStore(Storage(str(runs)).child("sn"))
    thread, seen = train_in_thread(sets, "sn")
    deadline = time.monotonic() + 360
    finished = lambda: "out" in seen or "error" in seen  # noqa: E731
    live = lambda: [k for k in (store.row_keys() if store.storage.exists("leaderboard") else ()) if "-live-" in k]  # noqa: E731

    # 1. the first score comes from the scorer on the second node; then that node goes
    _wait(lambda: finished() or live(), "a first score", deadline)
    assert not finished(), seen.get("error")
    node = next(iter(cluster.worker_nodes))
    before = _scorer_pids(node)
    assert len(before) == 1, "the scorer did not run on the scoring node"
    on_node = _descendants(node.all_processes["raylet"][0].process.pid)
    _kill_node(cluster, node)
    _wait(lambda: not any(_alive(p) for p in on_node), "the lost node's processes to be gone", deadline)
    _wait(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node.node_id), "the node marked dead",
          deadline)

    lost_at = time.time()

    # 2. a scoring node returns (training may have ended meanwhile: the coordinator drains, waiting for its scorer)
    back = cluster.add_node(num_cpus=0, resources={"scoring": 1})
    cluster.wait_for_nodes()
    _wait(lambda: finished() or _scorer_pids(back), "the scorer restarted on the new node", deadline, every=0.5)
    thread.join(max(1.0, deadline - time.monotonic()))
    assert "error" not in seen, seen["error"]
    out = seen["out"]
    assert out["status"] == "finished", out

    # every committed checkpoint: scored exactly once (one live row) or skipped with its reason; the last one scored
    keys = sorted(live())
    scored = {k.split("-fd_digits-")[0] for k in keys}
    assert len(keys) == len(scored)  # one row per checkpoint
    skipped = store.skipped()
    committed = {f"ckpt-{n:012d}" for n in _committed(store)}
    assert committed <= scored | set(skipped), (sorted(committed - scored - set(skipped)), skipped)
    assert max(committed) in scored
    rows = [r for r in store.read_rows() if r["kind"] == "live"]
    assert any(r["time"] > lost_at for r in rows), rows  # scored by the restarted scorer, after the loss
    assert {r["scorer"] for r in rows if r["time"] > lost_at}.isdisjoint({r["scorer"] for r in rows
                                                                          if r["time"] < lost_at})
