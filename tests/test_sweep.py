"""Ray Tune sweeps and staged pipelines on a real local Ray: a grid of 3 tiny digits trials (one forced to diverge
by a huge learning rate) on the loopback S3-API server (moto), SiD -> SiD²A on local storage with lineage and
resume after a stop between stages and after a SIGKILL of the driver mid-stage, a sweep driver killed mid-trial,
the report, and the one-line errors of bad sweep / pipeline files.

Trials are tiny (MLP teacher trained for 1 kimg, 6 steps of 32 images, 3 checkpoints each scored on 400 images);
most of the time is Ray starting processes. The test Ray has 6 logical CPUs so that 3 trials of 2 CPUs each
(driver 1 + worker 0.5 + scorer 0.5) run at once on this 2-core machine.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest
import yaml

from pipelines.cli import main
from store.run_store import RunStore
from store.storage import Storage
from ray_jobs.train import LiveScores
from schemas.run import RunConfig
from tests.recipes import CONFIG, TINY_TUNE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray for the module, started after the S3 fixture so that its processes inherit the credentials."""
    import ray

    ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    # the trial actors and Train workers import this checkout's code (ray_jobs/tune.py is new in it)
    where = ray.get(ray.remote(lambda: __import__("ray_jobs.tune", fromlist=["x"]).__file__).remote())
    assert Path(where).resolve() == ROOT / "ray_jobs" / "tune.py", where
    yield
    ray.shutdown()


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def run_cli(capsys, argv: list[str]) -> dict:
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return json.loads(out.out.strip().splitlines()[-1])


def sigkill_cli_when(argv: list[str], ready: Callable[[], bool], log_path: Path, timeout_s: float = 400) -> None:
    """Run ``sida ARGV`` as its own process joined to this module's Ray, SIGKILL it as soon as ``ready()`` holds
    (polled every 50 ms), and fail unless that kill is what ended it (not an exit before ``ready``)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token", SIDA_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv, "--address",
                                 ray.get_runtime_context().gcs_address], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout_s
            while time.time() < deadline and proc.poll() is None:
                if ready():
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]


GRID = {"name": "grid", "base": str(CONFIG), "axes": {"alpha": [0.5, 1.0]},
        "points": [{"alpha": 1.2, "lr": 1000.0}],  # diverges: loss_psi ~1e30 after one step
        "max_concurrent_trials": 3}


def test_grid_sweep_stops_the_diverging_trial_and_finishes_the_others(ray_cluster, tmp_path, s3_bucket, capsys):
    """On the loopback S3 server (the staged pipelines below run the same Tune code on local storage)."""
    uri, endpoint = s3_bucket.uri + "/sweeps", s3_bucket.endpoint_url
    extra = [f"storage.uri={uri}", "logging.tensorboard=true", f"storage.endpoint_url={endpoint}"]
    out = run_cli(capsys, ["sweep", write_yaml(tmp_path / "grid.yaml", GRID), *sets(TINY_TUNE + extra)])
    sweep = Storage(uri, endpoint_url=endpoint).child("grid")
    assert out["sweep_uri"] == sweep.uri
    trials = {t["name"]: t for t in out["trials"]}
    assert sorted(trials) == ["t00_alpha=0.5", "t01_alpha=1", "t02_alpha=1.2_lr=1000"]

    bad = trials.pop("t02_alpha=1.2_lr=1000")
    assert bad["state"] == "stopped" and "loss_psi blew up" in bad["reason"] and "loss_factor" in bad["reason"]
    bad_store = RunStore(sweep.child(bad["name"]))
    assert [e["kind"] for e in bad_store.events()] == ["start", "stopped"]
    assert bad_store.storage.listdir("events")[-1].endswith("-stopped.json")  # the state's value, not RunState.STOPPED
    assert bad_store.read_status()["reason"] == bad["reason"]
    assert bad_store.checkpoint_names()  # what it wrote before it was stopped stays

    for name, t in trials.items():  # the others went on to the end, each scored and its best pinned
        store = RunStore(sweep.child(name))
        assert t["state"] == "finished" and t["kimg"] == pytest.approx(0.192), t
        rows = [r for r in store.read_rows() if r["kind"] == "live"]
        assert {r["checkpoint"] for r in rows} == {"ckpt-000000000064", "ckpt-000000000128", "ckpt-000000000192"}
        assert all(r["trial"] == name and r["alpha"] == t["axes"]["alpha"] for r in rows)
        assert store.pinned() == [t["best"]["checkpoint"]] and math.isfinite(t["best"]["value"])
        # Tune saw the leaderboard score: the trial's last result carries its best live score
        results = [json.loads(line) for line in sweep.read_bytes(f"tune/{name}/result.json").decode().splitlines()]
        assert results[-1]["final"] == 1.0 and results[-1]["best_fid"] == pytest.approx(t["best"]["value"])
        assert all(r["fid_metric"] == "fd_digits" and "best_fid" in r for r in results[:-1])  # ... in every report
        # Tune's own TensorBoard x-axis is images seen; the trial's tracker mirrored its rows at their cur_nimg
        assert [r["timesteps_total"] for r in results[:-1]] == [r["cur_nimg"] for r in results[:-1]]
        assert_tensorboard_mirror(store, tmp_path / "tb" / name)
        # what rank 0 adds to a report: the newest and the best live score from the leaderboard (how many of them
        # land before training ends depends on timing; this reads the same rows after the end)
        live = LiveScores(store, RunConfig.model_validate(store.read_config()).metric).fields()
        assert live["best_fid"] == pytest.approx(t["best"]["value"]) and live["fid_kimg"] == pytest.approx(0.192)
    assert out["best"]["value"] == min(t["best"]["value"] for t in trials.values())
    assert {t["name"] for t in sweep.read_json("sweep.json")["outcomes"]} == {*trials, bad["name"]}

    # the trials are ordinary runs: the leaderboard reads the sweep folder as it reads any folder of runs
    ep = ["--endpoint-url", endpoint]
    assert main(["leaderboard", sweep.uri, "--by", "run", "--json", *ep]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert {r["run"] for r in ranked} >= set(trials)

    # the report: markdown + plots locally, and a copy in storage next to the trials
    rep = run_cli(capsys, ["report", sweep.uri, "--out", str(tmp_path / "report"), *ep])
    assert rep["kind"] == "sweep" and rep["runs"] == 3 and rep["best"]["value"] == pytest.approx(out["best"]["value"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "loss_psi blew up" in md and "t00_alpha=0.5" in md and "alpha=1.2, lr=1000" in md
    assert "Figure 2 for an alpha grid" in md  # an alpha sweep: the caption names the paper's figure
    for png in ("fd_vs_kimg.png", "best_per_trial.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
        assert sweep.read_bytes(f"report/{png}") == (tmp_path / "report" / png).read_bytes()
    # the samples of each trial's best checkpoint (its scorer's gallery), best trial first
    samples = [f for f in rep["files"] if f.startswith("samples-")]
    assert "## Samples" in md and samples[:2] == ["samples-1.png", "samples-2.png"] and "](samples-1.png)" in md
    best = RunStore(sweep.child(out["best"]["trial"]))
    assert (tmp_path / "report" / "samples-1.png").read_bytes() == best.storage.read_bytes(
        best.gallery_ref(out["best"]["checkpoint"]))


def assert_tensorboard_mirror(store: RunStore, local: Path) -> None:
    """The run's TensorBoard file (logging.tensorboard) holds loss_psi at each metric row's cur_nimg and each live
    score at its checkpoint's cur_nimg, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [name] = store.storage.listdir("tensorboard")
    local.mkdir(parents=True)
    (local / name).write_bytes(store.storage.read_bytes(f"tensorboard/{name}"))
    acc = EventAccumulator(str(local))
    acc.Reload()
    metrics = store.read_metrics().to_pylist()
    assert [e.step for e in acc.Scalars("train/loss_psi")] == [r["cur_nimg"] for r in metrics]
    live = sorted(r["cur_nimg"] for r in store.read_rows() if r["kind"] == "live")
    assert sorted(e.step for e in acc.Scalars("score/fd_digits")) == live


def bad_file_error(tmp_path, capsys, kind: str, data: dict) -> str:
    assert main([kind, write_yaml(tmp_path / f"{kind}.yaml", data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("change,expected", [
    ({"axes": {"alpah": [1.0]}}, ["unknown axis 'alpah'", "did you mean 'alpha'?", "lambda_adv_theta"]),
    ({"axes": {"alpha": []}}, ["axes.alpha: empty grid"]),
    ({"axes": {"alpha": {"uniform": [0, 1]}}}, ["axes.alpha", "search: random"]),
    ({"axes": {"lr": [1e-4, -1.0]}}, ["trial lr=-1", "optimizer.lr_theta", "greater than 0"]),
    ({"axes": {"storage.uri": ["x"]}}, ["cannot be swept"]),
    ({"base": "nowhere.yaml"}, ["base: run config 'nowhere.yaml' does not exist"]),
    ({"trials": 3}, ["trials: unknown key"]),
])
def test_bad_sweep_files_get_one_line_errors(tmp_path, capsys, change, expected):
    err = bad_file_error(tmp_path, capsys, "sweep", {**GRID, "points": [], **change})
    assert err.startswith("error: invalid sweep") and all(e in err for e in expected), err


STAGED = {"name": "staged", "base": str(CONFIG), "stages": [
    {"name": "sid", "method": "sid", "axes": {"alpha": [1.0]}},
    # a checkpoint after the first step, which only trains f_psi: its generator is exactly where theta started
    {"name": "sid2a", "method": "sid2a", "init_from": "sid", "axes": {"alpha": [1.0, 1.2]},
     "set": {"checkpoint_every_kimg": 0.032}, "max_concurrent_trials": 2}]}


@pytest.fixture(scope="module")
def staged(ray_cluster, tmp_path_factory):
    """SiD -> SiD²A on local storage, as three commands: with `--stop-after sid` (pipeline.json records stage 1 done);
    the same command without it, as its own process joined to this module's Ray, SIGKILLed as soon as a stage-2
    trial has committed its first checkpoint (a real kill of the driver mid-stage); the same command again. Returns
    (pipeline Storage, pipeline.json after the stop, stage 1's event files after the stop, pipeline.json after the
    kill, the temp folder)."""
    tmp = tmp_path_factory.mktemp("staged")
    argv = ["pipeline", write_yaml(tmp / "staged.yaml", STAGED), *sets(TINY_TUNE + [f"storage.uri={tmp / 'pipes'}"])]
    pipe = Storage(str(tmp / "pipes")).child("staged")
    assert main(argv + ["--stop-after", "sid"]) == 0
    events_before = sorted(pipe.child("sid", "t00_alpha=1").listdir("events"))
    state_before = pipe.read_json("pipeline.json")
    first = pipe.child("sid2a", "t00_alpha=1")
    sigkill_cli_when(argv, lambda: first.exists("ckpt-000000000032/manifest.json"), tmp / "pipeline.log")
    killed = pipe.read_json("pipeline.json")
    assert main(argv) == 0
    return pipe, state_before, events_before, killed, tmp


def test_pipeline_stopped_then_killed_mid_stage_resumes_where_it_was(staged):
    pipe, state_before, events_before, killed, _ = staged
    assert state_before["stages"]["sid"]["state"] == "done" and "sid2a" not in state_before["stages"]
    assert killed["current"] == "sid2a" and killed["stages"]["sid"] == state_before["stages"]["sid"]
    assert "sid2a" not in killed["stages"]  # the kill landed inside stage 2
    state = pipe.read_json("pipeline.json")
    assert state["current"] is None and [state["stages"][s]["state"] for s in ("sid", "sid2a")] == ["done", "done"]
    assert state["stages"]["sid"] == state_before["stages"]["sid"]  # stage 1 was not re-run, by either command ...
    assert sorted(pipe.child("sid", "t00_alpha=1").listdir("events")) == events_before  # ... no new start, no new end
    assert [t["state"] for t in state["stages"]["sid2a"]["outcomes"]] == ["finished", "finished"]
    # the stage-2 trial the kill interrupted went on from its checkpoint, every metric row once
    run = RunStore(pipe.child("sid2a", "t00_alpha=1"))
    kinds = [(e["kind"], e.get("checkpoint")) for e in run.events()]
    assert kinds[0] == ("start", None) and kinds[-1][0] == "finished", kinds
    resumed = [c for k, c in kinds if k == "resume"]
    assert resumed and all(c.startswith("ckpt-") for c in resumed), kinds  # from its checkpoint, not from 0
    assert run.read_metrics().column("cur_nimg").to_pylist() == list(range(32, 193, 32))


def test_pipeline_report_compares_the_methods(staged, capsys):
    pipe, _, _, _, tmp = staged
    ev = run_cli(capsys, ["evaluate", pipe.child("sid", "t00_alpha=1").uri, "--best", "--repeats", "2"])
    rep = run_cli(capsys, ["report", pipe.uri, "--out", str(tmp / "report")])
    assert rep["kind"] == "pipeline" and rep["runs"] == 3 and "methods.png" in rep["files"]
    md = (tmp / "report" / "report.md").read_text()
    assert "## Stages" in md and "SiD²A" in md and "lineage" in md and "sid2a/t01_alpha=1.2" in md
    # best per method, with the 2-seed re-score of SiD's best checkpoint (mean ± sample std)
    assert "## Best per method" in md
    sid_line = next(line for line in md.splitlines() if line.startswith("| SiD |"))
    assert f"{ev['mean']:.4f} ± {ev['std']:.4f} (n=2)" in sid_line, sid_line
    assert (tmp / "report" / "methods.png").stat().st_size > 10_000 and pipe.exists("report/methods.png")


def test_sid2a_starts_from_the_best_sid_checkpoint(staged):
    import torch

    pipe, state_before, _, _, _ = staged
    best = state_before["stages"]["sid"]["best"]
    sid_run = RunStore(pipe.child("sid").child("t00_alpha=1"))
    live = [r for r in sid_run.read_rows() if r["kind"] == "live"]
    assert best["checkpoint"] == min(live, key=lambda r: r["value"])["checkpoint"]  # the leaderboard's lowest
    assert best["uri"] == sid_run.storage.uri_of(f"pinned/{best['checkpoint']}")
    src_state, src_manifest = sid_run.load_checkpoint(f"pinned/{best['checkpoint']}")
    for trial in ("t00_alpha=1", "t01_alpha=1.2"):
        run = RunStore(pipe.child("sid2a").child(trial))
        lineage = run.lineage()
        assert lineage["content_hash"] == src_manifest["content_hash"] == best["checkpoint_hash"]
        assert lineage["uri"] == best["uri"] and lineage["source_run"] == sid_run.uri and lineage["stage"] == "sid"
        assert run.read_config()["init_generator"] == best["uri"]
        rows = run.read_rows()
        assert rows and all(r["init_generator"] == best["uri"] and r["method"] == "sid2a" for r in rows)
        start = next(e for e in run.events() if e["kind"] == "start")
        assert start["init_generator_hash"] == src_manifest["content_hash"]
        first, _ = run.load_checkpoint("ckpt-000000000032")  # after step 1 (f_psi only): theta untouched
        for name, w in src_state["generator_ema"].items():
            assert torch.equal(first["generator"][name], w), name


@pytest.mark.parametrize("stages,expected", [
    ([{"name": "sid", "method": "sid"}, {"name": "b", "method": "sid2a", "init_from": "sdi"}],
     ["stages[1] (b).init_from: 'sdi' is no stage", "expected one of the stages before it: sid"]),
    ([{"name": "b", "method": "sid2a", "init_from": "sid"}, {"name": "sid", "method": "sid"}],
     ["init_from: 'sid' is a later stage"]),
    ([{"name": "sid", "method": "sid"}, {"name": "b", "method": "sid2a"}], ["method 'sid2a' and init_from go together"]),
    ([{"name": "sid", "method": "sid"}, {"name": "b", "method": "sida", "init_from": "sid"}],
     ["stages[1] (b).init_from: method 'sida' starts from the teacher"]),
    ([{"name": "sid", "method": "sid"}, {"name": "sid", "method": "sida"}], ["'sid' is used twice"]),
    ([{"name": "sid", "method": "sid"}, {"name": "b", "axes": {"method": ["sida", "sid2a"]}}],
     ["stages[1] (b): method 'sid2a' and init_from go together"]),  # each method of a method axis is checked
    ([{"name": "sid", "method": "sid", "axes": {"alpha": []}}], ["stages.0.axes.alpha: empty grid"]),
    ([], ["stages: give at least one stage"]),
])
def test_bad_pipeline_files_get_one_line_errors(tmp_path, capsys, stages, expected):
    err = bad_file_error(tmp_path, capsys, "pipeline", {**STAGED, "stages": stages})
    assert err.startswith("error: invalid pipeline") and all(e in err for e in expected), err


KILLED = {"name": "killed", "base": str(CONFIG), "axes": {"lr": [1000.0, 1e-3]}, "max_concurrent_trials": 1}


def test_sweep_driver_killed_mid_trial_resumes_with_the_same_command(ray_cluster, tmp_path):
    """Issue 18 item 3, a real SIGKILL of the `sida sweep` driver (its own process, joined to this module's Ray)
    while its second trial trains; the same command again: the stopped trial stays stopped with its reason and is
    not re-run, the killed one resumes from its newest checkpoint (its dead trial's lease taken over at once) and
    ends with every metric row exactly once."""
    argv = ["sweep", write_yaml(tmp_path / "killed.yaml", KILLED),
            *sets(TINY_TUNE + [f"storage.uri={tmp_path / 's'}", "total_kimg=0.384", "metric.enabled=false"])]
    sweep = Storage(str(tmp_path / "s")).child("killed")
    bad, good = (RunStore(sweep.child(n)) for n in ("t00_lr=1000", "t01_lr=0.001"))
    sigkill_cli_when(argv, lambda: good.storage.exists("ckpt-000000000064/manifest.json") and good.read_status() is None,
                     tmp_path / "sweep.log")
    assert bad.read_status()["state"] == "stopped" and good.read_status() is None
    bad_events = bad.storage.listdir("events")

    assert main(argv) == 0  # the same command again
    trials = {t["name"]: t for t in sweep.read_json("sweep.json")["outcomes"]}
    assert trials["t00_lr=1000"]["state"] == "stopped" and "loss_psi blew up" in trials["t00_lr=1000"]["reason"]
    assert bad.storage.listdir("events") == bad_events  # not re-run
    assert trials["t01_lr=0.001"]["state"] == "finished" and trials["t01_lr=0.001"]["kimg"] == pytest.approx(0.384)
    kinds = [(e["kind"], e.get("checkpoint")) for e in good.events()]
    assert kinds[0] == ("start", None) and kinds[-1][0] == "finished", kinds
    resumed = [c for k, c in kinds if k == "resume"]
    assert resumed and resumed[0].startswith("ckpt-"), kinds  # from its checkpoint, not from 0
    assert good.read_metrics().column("cur_nimg").to_pylist() == list(range(32, 385, 32))  # each row once
    assert not good.storage.exists("lease.json")  # released at its end
    # the stopped trial's actor was killed by Tune (no finally ran, its lease stayed): the sweep removed it
    assert not bad.storage.exists("lease.json")
