"""The logging mirrors (ray_jobs/tracking.py) on a run folder written by hand: a tracking service that is down when
the run starts never stops training, and gets every point once it is back."""
from __future__ import annotations

import pytest

from ray_jobs.tracking import Tracker, metric_points
from schemas.run import LoggingConfig, MlflowLogging
from store.run_store import RunStore
from store.storage import Storage


def rows(store: RunStore, nimgs) -> list[dict]:
    out = [{"step": i, "cur_nimg": n, "kimg": n / 1000, "stage": "sid", "loss_psi": 1.0 / (i + 1), "loss_G": None,
            "images_per_s": 50.0, "time": 0.0} for i, n in enumerate(nimgs)]
    for r in out:
        store.append_metrics(r)
    return out


def test_a_tracking_store_down_at_start_is_retried_and_gets_every_point(tmp_path):
    from mlflow.tracking import MlflowClient

    store = RunStore(Storage(str(tmp_path / "runs")).child("r"))
    written = rows(store, [64, 128])
    blocker = tmp_path / "mlruns"
    blocker.write_text("not a folder")  # MLflow cannot create its store here
    lines: list[str] = []
    cfg = LoggingConfig(tensorboard=True, mlflow=MlflowLogging(tracking_uri=f"file:{blocker}"))
    tracker = Tracker(store, cfg, {"method": "sida"}, lines.append)
    assert tracker.sinks[1] is None and len(lines) == 1 and lines[0].startswith("logging: mlflow unavailable")
    assert "\n" not in lines[0]
    assert tracker.sync() == 2 * 3  # loss_psi, images_per_s, stage per row; TensorBoard took them
    assert len(store.storage.listdir("tensorboard")) == 1

    blocker.unlink()  # the store is back: the next sync makes the sink and hands it what it missed
    written += rows(store, [192])
    assert tracker.sync() == 3
    tracker.close()
    client = MlflowClient(tracking_uri=f"file:{blocker}")
    [run] = client.search_runs([client.get_experiment_by_name("sida").experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss_psi"))
    assert history == [(r["cur_nimg"], pytest.approx(r["loss_psi"])) for r in written]
    assert run.info.status == "RUNNING"  # no status.json: the run has not ended


def test_metric_points_skip_counters_missing_and_non_finite_values():
    row = {"step": 3, "cur_nimg": 96, "kimg": 0.096, "stage": "fake_score", "loss_psi": float("nan"), "loss_G": None,
           "images_per_s": 12.5, "time": 1.0}
    assert sorted(metric_points(row)) == [("train/images_per_s", 12.5, 96), ("train/stage", 0.0, 96)]


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("wandb") is not None, reason="wandb is installed here")
@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_logging_package_that_is_missing_is_one_line_before_anything_is_written(command, tmp_path, capsys):
    from pipelines.cli import main
    from tests.recipes import CONFIG

    runs = tmp_path / "runs"
    code = main([command, str(CONFIG), "--set", f"storage.uri={runs}", "--set", "logging.wandb.project=p"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: logging.wandb needs the wandb package: pip install wandb"
    assert not runs.exists() or not any(runs.iterdir())  # no run folder, no teacher, no Ray start
