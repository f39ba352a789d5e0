"""The step benchmarks run (small, on the CPU) so that the GPU checks in benchmarks/ do not rot between GPU runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-channels", "8", "--channel-mult", "1,2", "--resolution", "8", "--batch", "8", "--threads", "1",
        "--device", "cpu", "--steps", "2", "--warmup", "1"]


def run_json(*cmd: str, timeout: float = 600) -> dict:
    p = subprocess.run([*cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_step_throughput_matrix_times_every_combination():
    out = run_json(sys.executable, "benchmarks/step_throughput.py", *TINY, "--matrix")
    rows = out["matrix"]["combinations"]
    assert len(rows) == 8  # 3 eager options: every combination, compile not asked for
    assert {r["options"] for r in rows} >= {"eager (no options)", "channels_last, adam=fused, single_psi_forward"}
    eager = next(r for r in rows if r["options"] == "eager (no options)")
    assert eager["sida_speedup_over_eager"] == 1.0
    assert all(r["sida_images_per_s"] > 0 and r["sid_images_per_s"] > 0 and r["sida_over_sid_time"] > 0 for r in rows)
    assert out["matrix"]["best"] in {r["options"] for r in rows}


def test_step_throughput_options_and_profile():
    out = run_json(sys.executable, "benchmarks/step_throughput.py", *TINY, "--single-psi-forward", "--fused-adam")
    assert out["options"] == "adam=fused, single_psi_forward" and out["sida"]["stage"] == "sida"
    prof = run_json(sys.executable, "benchmarks/step_profile.py", *TINY, "--channels-last")
    phases = prof["phases_ms_per_step"]
    for phase in ("psi step: psi forward", "theta step: backward (+ DDP sync)", "teacher forward", "EMA"):
        assert phases[phase] > 0, phase
    assert prof["options"] == "channels_last"


@pytest.mark.slow
def test_gpu_suite_runs_small_on_cpu():
    """benchmarks/gpu_suite.sh --small: every part (option matrix, eager and best step, a 1-worker `sida train` with
    a scorer) runs and the summary has each part's headline numbers."""
    out = run_json("bash", "benchmarks/gpu_suite.sh", "--small", timeout=900)
    assert out["device"] == "cpu" and out["small"] is True
    assert out["all_ok"], {k: v.get("error") for k, v in out["parts"].items() if not v["ok"]}
    s = out["summary"]
    assert set(s) == {"matrix_digits", "step_small_eager", "step_small_best", "sida_train_1worker"}
    assert s["step_small_best"]["options"] == "channels_last, adam=fused, single_psi_forward"
    assert s["sida_train_1worker"]["status"] == "finished"


@pytest.mark.slow
def test_data_throughput_runs_small_and_prepared_memory_stays_flat():
    """benchmarks/data_throughput.py --small: prepared datasets (local and S3) and the in-memory loader, 2 workers."""
    out = run_json(sys.executable, "benchmarks/data_throughput.py", "--small", timeout=600)
    paths = {(r["path"], r["images"]) for r in out["rows"]}
    assert paths == {(p, n) for p in ("prepared/local", "prepared/s3", "memory (data.kind npz)") for n in (500, 2000)}
    assert all("error" not in r and r["images_per_s_min_worker"] > 0 for r in out["rows"])
    assert out["delivery_over_consumption"] > 1
    # the prepared path reads on demand: its per-worker peak does not follow the dataset (the in-memory one does)
    for p in ("prepared/local", "prepared/s3"):
        assert out["peak_rss_growth"][p]["peak_over_imports_mb"][1] < 64, out["peak_rss_growth"]
    mem = out["peak_rss_growth"]["memory (data.kind npz)"]["peak_over_imports_mb"]
    assert mem[1] > mem[0] + 40, out["peak_rss_growth"]


def test_leaderboard_scale_runs_small_on_a_real_s3_server():
    """benchmarks/leaderboard_scale.py, small: rows written to moto S3, the leaderboard before and after
    compaction identical, one object per run left besides its config, status and event."""
    out = run_json(sys.executable, "benchmarks/leaderboard_scale.py", "--runs", "5", "--checkpoints", "3", "--seeds", "2",
                   timeout=300)
    assert out["rows"] == 30 and out["runs_shown"] == 5 and out["same_leaderboard"] is True
    # per run: config.json, status.json, one event, one compacted part, its .indexed marker; the root index
    assert out["objects_after"] == 5 * 5 + 1
    assert out["dirty_after_s"] > 0
    assert out["before_s"] > 0 and out["after_s"] > 0


def test_scoring_throughput_runs_small_on_cpu():
    """benchmarks/scoring_throughput.py, small: a real run folder scored by CheckpointScorer.score, its time split
    into checkpoint load, generation, features and metrics, each metric group timed alone (no Inception, no Ray:
    the Inception path and the slow-down are the full benchmark's)."""
    out = run_json(sys.executable, "benchmarks/scoring_throughput.py", "--size", "digits", "--num-images", "64",
                   "--batch-size", "32", "--skip-inception", "--no-slowdown", timeout=300)
    assert {"device", "device_name", "torch_threads", "size", "network", "scores", "training_slowdown"} <= set(out)
    assert out["size"] == "digits" and out["torch_threads"] >= 1 and out["network"]["parameters"] > 0
    assert out["scores"]["fid_inception"] == {"skipped": "--skip-inception"}
    assert out["training_slowdown"] == {"skipped": "--no-slowdown"}
    s = out["scores"]["fd_digits"]
    assert s["metrics"] == ["fd_digits", "kid_digits", "precision_digits", "recall_digits"] and s["num_images"] == 64
    assert s["reference"]["images"] == 64 and s["reference"]["seconds"] > 0
    for key in ("first_score_s", "score_s", "images_per_s_end_to_end", "generation_img_s"):
        assert s[key] > 0, key
    assert set(s["features_img_s"]) == {"fd_digits"} and s["features_img_s"]["fd_digits"] > 0
    parts = s["seconds"]
    assert set(parts) == {"load_checkpoint", "generation", "features_fd_digits", "metrics", "other"}
    assert all(parts[k] > 0 for k in parts if k != "other")
    assert sum(parts.values()) == pytest.approx(s["score_s"], abs=0.01)  # the parts add up to the whole score
    assert set(s["metric_seconds"]) == {"fd_digits", "kid_digits", "precision_digits+recall_digits"}
    assert all(v > 0 for v in s["metric_seconds"].values())
