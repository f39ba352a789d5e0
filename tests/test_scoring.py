"""Asynchronous FID scoring on a real local Ray: scorer actors, the coordinator's backlog policy, a scorer
killed by PID mid-run, scores appearing while `sida train` still runs (local and loopback S3), pinning of
the best checkpoint, `sida leaderboard` (table, JSON, plot) and `sida evaluate --best`.

The metric is FD-digits through clean-fid's feature path (the digit classifier is trained once into the
test cache); generators are tiny MLPs, so a score of a few hundred images takes well under a second.
"""
from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.cli import main
from pipelines.train import run_train
from store.run_store import RunStore
from ray_jobs.scoring import CheckpointScorer, ScoringCoordinator, make_scorers
from ray_jobs.tracking import Tracker
from store.storage import Storage
from ray_jobs.train import public_config
from schemas.loader import load_run_config
from schemas.run import DataConfig
from sida_core.data import load_dataset
from sida_core.metrics import digits_feature_space
from sida_core.metrics.score import generator_inputs, score_generator
from sida_core.training_loop import build_distiller, get_teacher, network_spec, save_distill_checkpoint
from tests.recipes import CONFIG, TINY_RAY, TINY_STEPS, TINY_TEACHER

SCORING = ["metric.enabled=true", "metric.num_images=400", "metric.batch_size=200"]


class Replay(torch.nn.Module):
    """A 'generator' that returns the given images in order: scoring it must give FD(images, reference)."""

    def __init__(self, images):
        super().__init__()
        self.images, self.pos = images, 0

    def forward(self, x, sigma, labels=None):
        out = self.images[self.pos: self.pos + len(x)]
        self.pos += len(x)
        return out


class Noise(torch.nn.Module):
    def forward(self, x, sigma, labels=None):
        return (x / sigma.view(-1, 1, 1, 1)).clamp(-1, 1)


def test_generation_seeds_do_not_depend_on_batch_size():
    a = torch.cat([z for z, _ in generator_inputs(700, 5, (1, 8, 8), 0, batch_size=64)])
    b = torch.cat([z for z, _ in generator_inputs(700, 5, (1, 8, 8), 0, batch_size=500)])
    c = torch.cat([z for z, _ in generator_inputs(700, 6, (1, 8, 8), 0, batch_size=500)])
    assert a.shape == (700, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_score_of_the_data_is_the_real_floor_and_noise_scores_far_worse():
    space = digits_feature_space()
    train, holdout = load_dataset(DataConfig())
    ref = space.stats(train.images)
    floor = space.fd(holdout.images, ref)
    kw = dict(num_images=len(holdout), seed=0, sigma_init=2.5, img_shape=(1, 8, 8), batch_size=100)
    replayed = score_generator(Replay(holdout.images), space, ref, **kw)
    noise = score_generator(Noise(), space, ref, **kw)
    assert replayed == pytest.approx(floor, rel=1e-6)  # same images, features taken in batches of 100
    assert 1.0 < floor < 3.0 and noise > 20 * floor, (floor, noise)


# ---------------------------------------------------------------------------------------------- Ray fixtures
@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray for the module (after the S3 fixture, so its processes inherit the S3 credentials)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def make_run(storage: Storage, nimgs: list[int], extra=(), bad: set[int] = frozenset()) -> tuple[RunStore, object]:
    """A run folder with config.json and one checkpoint per entry of ``nimgs`` (the teacher-initialised
    generator; for ``bad`` ones the EMA generator's weights get large noise)."""
    cfg = load_run_config(CONFIG, TINY_RAY + SCORING + list(extra))
    train_set, _ = load_dataset(cfg.data)
    teacher, _ = get_teacher(cfg, train_set, torch.device("cpu"), log=lambda m: None)
    distiller = build_distiller(cfg, teacher, train_set, torch.device("cpu"))
    store = RunStore(storage)
    store.write_config(public_config(cfg))
    good = {k: v.clone() for k, v in distiller.G_ema.state_dict().items()}
    for n in nimgs:
        distiller.cur_nimg = n
        with torch.no_grad():
            for name, p in distiller.G_ema.named_parameters():
                p.copy_(good[name] + (torch.randn_like(p) if n in bad else 0))
        tmp = Path(os.environ["SIDA_CACHE"]) / f"ckpt-src-{os.getpid()}-{time.time_ns()}"
        store.upload_checkpoint(save_distill_checkpoint(distiller, tmp, cfg, network_spec(cfg, train_set)),
                                f"ckpt-{n:012d}")
    return store, cfg


def live_keys(store: RunStore) -> list[str]:
    return sorted(k for k in store.row_keys() if "-live-" in k)


# ---------------------------------------------------------------------------------------------- actors
def test_actor_scores_equal_in_process_scores_and_track_the_weights(ray_cluster, s3_bucket):
    """The actor computes exactly what the (known-correct, see above) in-process path computes. The tiny
    1-kimg MLP teacher gives a collapsed one-step generator (FD ~1160 here: its outputs barely vary), and a
    copy with noised weights another value; both lie far above the real floor (~1.7)."""
    import ray

    store, _ = make_run(Storage(s3_bucket.uri + "/runs/actor", endpoint_url=s3_bucket.endpoint_url), [64, 128],
                        bad={128})
    actor = make_scorers(load_run_config(CONFIG, SCORING).metric, n=1)[0]
    init, noised = ray.get([actor.score.remote(store.storage, "ckpt-000000000064", seed=3),
                            actor.score.remote(store.storage, "ckpt-000000000128", seed=3)])
    here = CheckpointScorer().score(store.storage, "ckpt-000000000064", seed=3)  # rewrites the same row
    assert here["value"] == pytest.approx(init["value"], rel=1e-9)  # same seeds -> same images, any process
    assert abs(noised["value"] - init["value"]) > 0.1 * init["value"]
    assert min(init["value"], noised["value"]) > 50, (init["value"], noised["value"])
    rows = store.read_rows()
    assert [(r["checkpoint"], r["seed"], r["kind"]) for r in rows] == [
        ("ckpt-000000000064", 3, "live"), ("ckpt-000000000128", 3, "live")]  # the rewrite did not duplicate
    assert rows[0]["checkpoint_uri"] == store.storage.uri_of("ckpt-000000000064") and rows[0]["num_images"] == 400
    assert rows[0]["extractor_id"].startswith("digits-cnn/") and rows[0]["method"] == "sida"
    assert rows[0]["protocol"] == "clean"  # each row says which FID protocol (clean-fid mode) it was scored in
    # each live score wrote its checkpoint's gallery: 64 fixed seeds (8 x 8 tiles of 32 px + 1 px padding),
    # whatever the scoring seed (the in-process re-score with seed 3 rewrote the actor's bytes identically)
    galleries = {n: store.storage.read_bytes(store.gallery_ref(n)) for n in ("ckpt-000000000064", "ckpt-000000000128")}
    with Image.open(io.BytesIO(galleries["ckpt-000000000064"])) as im:
        assert im.format == "PNG" and im.size == (8 * 33 + 1, 8 * 33 + 1) and im.mode == "L"
    assert galleries["ckpt-000000000064"] != galleries["ckpt-000000000128"]  # the noised weights look different
    CheckpointScorer().score(store.storage, "ckpt-000000000064", seed=4)
    assert store.storage.read_bytes(store.gallery_ref("ckpt-000000000064")) == galleries["ckpt-000000000064"]
    store.storage.delete(store.gallery_ref("ckpt-000000000128"))
    CheckpointScorer().score(store.storage, "ckpt-000000000128", seed=5, kind="final")  # re-scores: no gallery
    assert not store.has_gallery("ckpt-000000000128") and store.has_gallery("ckpt-000000000064")
    ray.kill(actor)


def test_backlog_policy_skips_oldest_and_records_rotation(ray_cluster, tmp_path):
    store, cfg = make_run(Storage(str(tmp_path / "run")), [64, 128, 192, 256, 320, 384], ["metric.max_backlog=2"])
    coord = ScoringCoordinator(store, make_scorers(cfg.metric, n=1), cfg.metric, poll_s=0.1, log=lambda m: None)
    coord.poll()  # 6 waiting: the newest goes to the scorer, 2 may wait, the 3 oldest are skipped
    assert coord.summary()["in_flight"] == 1
    store.storage.delete("ckpt-000000000256")  # rotated away while waiting
    out = coord.finish(timeout_s=120)
    assert live_keys(store) == [f"ckpt-{n:012d}-fd_digits-live-s0" for n in (320, 384)]
    skipped = store.skipped()
    assert sorted(skipped) == [f"ckpt-{n:012d}" for n in (64, 128, 192, 256)]
    assert all("fell behind" in skipped[f"ckpt-{n:012d}"] for n in (64, 128, 192))
    assert "rotation" in skipped["ckpt-000000000256"]
    assert out["scored"] == 2 and out["skipped"] == 4 and out["best"]["checkpoint"] in store.pinned()
    coord.close()


def test_scorer_killed_mid_run_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    import ray

    nimgs = [64, 128, 192, 256]
    store, cfg = make_run(Storage(str(tmp_path / "run")), nimgs, ["metric.num_images=6000", "metric.max_backlog=10"])
    scorers = make_scorers(cfg.metric, n=1)
    first_pid = int(ray.get(scorers[0].ident.remote()).rsplit(":", 1)[1])
    coord = ScoringCoordinator(store, scorers, cfg.metric, poll_s=0.1, log=lambda m: None).start()
    deadline = time.time() + 120
    while not live_keys(store) and time.time() < deadline:  # first score written ...
        time.sleep(0.05)
    time.sleep(0.3)  # ... and the next one under way
    assert live_keys(store) and coord.summary()["in_flight"] == 1
    os.kill(first_pid, signal.SIGKILL)
    out = coord.finish(timeout_s=240)
    keys = live_keys(store)
    assert keys == [f"ckpt-{n:012d}-fd_digits-live-s0" for n in nimgs], keys
    assert out["scored"] == 4 and out["skipped"] == 0 and out["in_flight"] == 0
    assert any("died" in e for e in coord.errors), coord.errors
    rows = store.read_rows()
    assert len(rows) == 4 and len({r["checkpoint"] for r in rows}) == 4
    pids = {r["scorer"].rsplit(":", 1)[1] for r in rows}
    assert str(first_pid) in pids and len(pids) == 2  # the restarted actor scored the rest
    assert sum(coord.dispatches.values()) == len(nimgs) + 1  # only the killed score was dispatched again
    coord.close()


def test_a_sweep_run_again_scores_what_its_ended_trials_left_unscored(ray_cluster, tmp_path):
    """A sweep driver killed after a trial finished training but before its scorers drained leaves that trial
    finished and partly scored; the sweep run again does not re-run an ended trial, so it scores the rest (and pins
    the best), and starts no scorer for trials that owe nothing or are still to run (they score their own)."""
    from types import SimpleNamespace

    from pipelines.sweep import score_leftovers
    from ray_jobs.scoring import unscored
    from store.run_store import RunState

    exp = Storage(str(tmp_path / "sweep"))
    ended, cfg = make_run(exp.child("t00"), [64, 128, 192], bad={128})  # two different values: one best
    ended.record_skip("ckpt-000000000064", "scoring fell behind (test)")
    ended.record_end(RunState.FINISHED, cur_nimg=192)
    running, _ = make_run(exp.child("t01"), [64])  # no status: its trial resumes with its own scorers
    assert unscored(ended, cfg.metric) == ["ckpt-000000000128", "ckpt-000000000192"]
    plans = [SimpleNamespace(name=n, cfg=cfg) for n in ("t00", "t01")]
    logs: list[str] = []
    score_leftovers(plans, exp, log=logs.append)
    assert live_keys(ended) == [f"ckpt-{n:012d}-fd_digits-live-s0" for n in (128, 192)]  # the skipped one stays so
    assert unscored(ended, cfg.metric) == [] and ended.pinned() == [ended.best_live_row()["checkpoint"]]
    assert running.read_rows() == [] and logs[0] == "[t00] scoring 2 checkpoint(s) its trial left unscored"
    logs.clear()
    score_leftovers(plans, exp, log=logs.append)  # nothing owed now: no scorer, not a word
    assert logs == []


# ---------------------------------------------------------------------------------------------- live, end to end
MLFLOW: dict[str, str] = {}  # live_run's MLflow file stores, by storage kind


@pytest.fixture(scope="module")
def live_run(ray_cluster, tmp_path_factory, s3_server):
    """One `sida train` per storage kind with scoring on; checkpoints every 2 steps."""
    bucket = f"live-{os.getpid()}"
    s3_server.create_bucket(bucket)
    runs = {}
    for where in ("local", "s3"):
        uri = str(tmp_path_factory.mktemp("live") / "runs") if where == "local" else f"s3://{bucket}/runs"
        MLFLOW[where] = f"file:{tmp_path_factory.mktemp('mlruns')}"
        sets = TINY_TEACHER + TINY_STEPS + SCORING + [
            f"storage.uri={uri}", "total_kimg=0.96", "checkpoint_every_kimg=0.064", "keep_checkpoints=20",
            "metric.max_backlog=20", "scaling.cpus_per_worker=1",
            # the mirrors of test_tensorboard_and_mlflow_...: synced twice a second while the run trains
            "logging.tensorboard=true", f"logging.mlflow.tracking_uri={MLFLOW[where]}", "logging.every_s=0.5"]
        if where == "s3":
            sets.append(f"storage.endpoint_url={s3_server.endpoint_url}")
        out = run_train(str(CONFIG), sets, workers=2, name="live", log=lambda m: None)
        runs[where] = (out, RunStore(Storage(uri, endpoint_url=s3_server.endpoint_url).child("live")))
    return runs


@pytest.mark.parametrize("where", ["local", "s3"])
def test_scores_appear_while_training_runs_and_best_is_pinned(live_run, where):
    out, store = live_run[where]
    assert out["status"] == "finished" and len(out["checkpoints"]) == 15
    rows = store.read_rows()
    scored = {r["checkpoint"] for r in rows}
    assert scored | set(store.skipped()) == set(out["checkpoints"])  # each scored or skipped with a reason
    assert out["checkpoints"][-1] in scored  # the final checkpoint is always scored
    finished = next(e["time"] for e in store.events() if e["kind"] == "finished")
    assert min(r["time"] for r in rows) < finished  # scores land while the workers are still training
    best = min(rows, key=lambda r: r["value"])
    assert out["scoring"]["best"]["checkpoint"] == best["checkpoint"] and store.pinned() == [best["checkpoint"]]
    assert store.checkpoint_ref(best["checkpoint"]) == f"pinned/{best['checkpoint']}"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tensorboard_and_mlflow_mirror_losses_and_scores_at_their_steps(live_run, where, tmp_path):
    """logging.tensorboard / logging.mlflow of a real `sida train`, read back with TensorBoard's and MLflow's own
    readers: every loss at the cur_nimg of its metric row, every live score at its checkpoint's cur_nimg (not when
    it arrived), the stage as its index, and no point twice."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sida_core.methods.base import Stage

    out, store = live_run[where]
    metrics = store.read_metrics().to_pylist()
    live = sorted((r["cur_nimg"], r["value"]) for r in store.read_rows() if r["kind"] == "live")
    assert len(metrics) >= 10 and len(live) >= 5
    losses = {key: [(r["cur_nimg"], r[key]) for r in metrics if r[key] is not None] for key in ("loss_psi", "loss_G")}
    assert losses["loss_G"] and len(losses["loss_G"]) < len(metrics)  # G starts after the fake-score stage
    stages = [(r["cur_nimg"], float([s.value for s in Stage].index(r["stage"]))) for r in metrics]
    metric = out["scoring"]["best"]["metric"]

    names = store.storage.listdir("tensorboard")
    assert len(names) == 1 and "tfevents" in names[0]  # one session, one file
    (tmp_path / names[0]).write_bytes(store.storage.read_bytes(f"tensorboard/{names[0]}"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()

    def tb(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    def same(got, want, rel=1e-6):  # the same steps, the same values (float32 in event files)
        return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)

    for key, series in losses.items():
        assert same(tb(f"train/{key}"), series)
    assert tb("train/stage") == stages
    assert same(sorted(tb(f"score/{metric}")), live)

    client = MlflowClient(tracking_uri=MLFLOW[where])
    [run] = client.search_runs([client.get_experiment_by_name("sida").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["sida.run_uri"] == store.uri
    assert run.data.params["method"] == "sida" and run.data.params["loss.alpha"] == "1.0"

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    for key, series in losses.items():
        assert same(history(f"train/{key}"), series, rel=1e-12)
    assert same(history(f"score/{metric}"), live, rel=1e-12)

    # a second tracker session (a resumed run's driver): the same MLflow run, no point twice; one TensorBoard file
    cfg = load_run_config(str(CONFIG), ["logging.tensorboard=true", f"logging.mlflow.tracking_uri={MLFLOW[where]}"])
    tracker = Tracker.for_run(store, cfg, log=pytest.fail)
    assert tracker is not None and tracker.sync() > 0 and tracker.sync() == 0  # replays storage once, then nothing new
    tracker.close()
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for key, series in losses.items():
        assert same(history(f"train/{key}"), series, rel=1e-12)
    assert same(history(f"score/{metric}"), live, rel=1e-12)
    again = store.storage.listdir("tensorboard")
    assert len(again) == 1 and again != names  # the new session's file replaced the old one


def test_leaderboard_views_and_evaluate(live_run, capsys, tmp_path):
    out, store = live_run["local"]
    root = str(Path(store.uri).parent)
    assert main(["leaderboard", root, "--json", "--top", "3"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert len(top) == 3 and [r["value"] for r in top] == sorted(r["value"] for r in top)
    assert main(["leaderboard", root, "--by", "run", "--plot", str(tmp_path / "fd.png")]) == 0
    table = capsys.readouterr().out
    assert "live" in table and top[0]["checkpoint"] in table and "1 row(s), by run" in table
    assert (tmp_path / "fd.png").stat().st_size > 10_000

    assert main(["evaluate", store.uri, "--best", "--repeats", "3", "--num-images", "300"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["checkpoint"] == top[0]["checkpoint"] and ev["repeats"] == 3 and len(set(ev["values"])) == 3
    assert ev["source"].endswith(f"pinned/{ev['checkpoint']}") and ev["std"] > 0
    finals = [r for r in store.read_rows() if r["kind"] == "final"]
    assert sorted(r["seed"] for r in finals) == [1_000_000, 1_000_001, 1_000_002]
    assert main(["evaluate", store.uri, "--best", "--repeats", "3", "--num-images", "300"]) == 0  # reuses rows
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["values"] == ev["values"] and len([r for r in store.read_rows() if r["kind"] == "final"]) == 3
    assert main(["leaderboard", store.uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["final_repeats"] == 3


def test_leaderboard_and_evaluate_errors(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path)]) == 2
    assert "no sida run found" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--best"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "--best" in capsys.readouterr().err


def test_a_score_split_over_scorers_equals_one_pass(ray_cluster, tmp_path):
    """50k-image scores on CPU clusters: each actor generates and extracts only its range of the images; the merged
    features are one pass's exactly (per-chunk seeding, the last chunk drawn at its one-pass size), so every metric
    equals the in-process score, and `sida evaluate --scorers` writes the same final rows."""
    import ray

    from pipelines.leaderboard import run_evaluate
    from ray_jobs.scoring import score_split

    store, cfg = make_run(Storage(str(tmp_path / "split")), [64], extra=["metric.names=[fd_digits,kid_digits]",
                                                                         "metric.num_images=300", "metric.gallery=0"])
    one = CheckpointScorer().score(store.storage, "ckpt-000000000064", seed=9, kind="final")
    actors = make_scorers(cfg.metric, n=3)
    split = score_split(store.storage, "ckpt-000000000064", actors, seed=9)  # ranges 0-99, 100-199, 200-299
    assert split["value"] == one["value"] and split["also"] == one["also"] and split["num_images"] == 300
    for a in actors:
        ray.kill(a)
    out = run_evaluate(store.uri, checkpoint="ckpt-000000000064", repeats=1, scorers=2, log=lambda m: None)
    alone = CheckpointScorer().score(store.storage, "ckpt-000000000064", seed=out_seed(out), kind="final")
    assert out["values"] == [round(alone["value"], 6)]
    assert out["metrics"]["kid_digits"]["mean"] == alone["also"]["kid_digits"]


def out_seed(out: dict) -> int:
    from pipelines.leaderboard import FINAL_SEED0

    assert out["repeats"] == 1
    return FINAL_SEED0
