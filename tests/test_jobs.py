"""``sida submit`` / ``sida jobs`` against a real Ray head (``ray start --head``, dashboard and Jobs API on
127.0.0.1, token authentication on with a token of its own; tests/ray_head.py), plus the job spec and the
resource check on their own.

Jobs run this worktree's code: the job's runtime_env puts it on PYTHONPATH and the entrypoint program is
``sys.executable -m pipelines.cli`` (on a real cluster: plain ``sida``, installed by the setup commands).
Sizes are tiny (an MLP teacher trained for 1 kimg, batches of 2 x 16 images).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ray_jobs.jobs import check_resources, JobError
from store.run_store import RunStore
from store.storage import Storage
from schemas.job import CONFIG_VALIDATORS, JobSpec, Request, check_job, load_job_spec
from schemas.loader import ConfigError, validate
from tests.ray_head import remove, short_base, start_ray_head, train_worker_pids
from tests.recipes import CONFIG, ROOT, TINY_STEPS, TINY_TEACHER

TINY = TINY_TEACHER + TINY_STEPS + ["optimizer.lr_psi=1e-3", "optimizer.lr_theta=1e-3", "metric.num_images=200"]
PROGRAM = f"{sys.executable} -m pipelines.cli"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def head(tmp_path_factory, s3_server):
    """One private Ray head for the module, 4 logical CPUs (2 train workers + the job driver, on 2 cores)."""
    base, made_here = short_base(tmp_path_factory.mktemp("rh"))
    h = start_ray_head(base, num_cpus=4)
    try:
        yield h
    finally:
        remove(h)
        assert not h.own_pids(), "processes of the test's Ray head survived its teardown"
        if made_here:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def client_env(head):
    """The submitting shell: this worktree's code, the head's token (via RAY_AUTH_TOKEN_PATH), no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env.update(head.client_env, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    return env


def sida(args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def write_job(path: Path, **fields) -> Path:
    job = {"kind": "train", "config": str(CONFIG), "program": PROGRAM,
           "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT), "SIDA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                                        "PYTHONUNBUFFERED": "1"}},
           "forward_env": ["SIDA_CACHE"], **fields}
    path.write_text(yaml.safe_dump(job))
    return path


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_leaderboard(store: RunStore) -> None:
    """The scorer actors the job's `sida train` started scored every checkpoint (RUN_URI/leaderboard/*.parquet)
    and pinned the best one."""
    rows = [r for r in store.read_rows() if r["kind"] == "live"]
    assert sorted(r["checkpoint"] for r in rows) == store.checkpoint_names()
    assert all(r["num_images"] == 200 and r["metric"] == "fd_digits" and r["value"] > 0 for r in rows)
    assert store.pinned() == [min(rows, key=lambda r: r["value"])["checkpoint"]]


# ------------------------------------------------------------------------------------------- round trips
def test_submit_train_job_follow_to_succeeded_and_find_the_run_in_s3(head, client_env, tmp_path, s3_bucket):
    uri = f"{s3_bucket.uri}/runs"
    job = write_job(tmp_path / "job.yaml", name="rt1", overrides=TINY + [
        "total_kimg=0.128", "checkpoint_every_kimg=0.064"],
        resources={"num_workers": 2, "cpus_per_worker": 1},
        storage={"uri": uri, "endpoint_url": s3_bucket.endpoint_url, "region": "us-east-1"},
        forward_env=["SIDA_CACHE"], tags={"suite": "test_jobs"})  # S3 keys: the head's own environment
    t0 = time.time()
    proc = sida(["submit", job, "--address", head.dashboard_url], client_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["job_id"].startswith("raysubmit_") and out["run_uri"] == f"{uri}/rt1"
    assert out["entrypoint"].startswith(PROGRAM + " train digits.yaml --name rt1 --set ")

    logs = sida(["jobs", "logs", out["job_id"], "--follow", "--address", head.dashboard_url], client_env)
    assert logs.returncode == 0, (logs.stdout[-3000:], logs.stderr[-2000:], head.log_tail())
    assert '"status": "finished"' in logs.stdout  # sida train's summary line, streamed live
    status = json.loads(sida(["jobs", "status", out["job_id"], "--address", head.dashboard_url], client_env).stdout)
    assert status["status"] == "SUCCEEDED" and status["metadata"]["sida_name"] == "rt1"
    assert status["metadata"]["suite"] == "test_jobs" and status["metadata"]["sida_run_uri"] == f"{uri}/rt1"
    print(f"submit -> SUCCEEDED in {time.time() - t0:.1f} s")

    store = RunStore(Storage(uri, endpoint_url=s3_bucket.endpoint_url).child("rt1"))
    assert store.read_status()["state"] == "finished"
    assert store.read_config()["total_kimg"] == 0.128 and store.read_config()["scaling"]["num_workers"] == 2
    assert store.checkpoint_names() == ["ckpt-000000000064", "ckpt-000000000128"]
    for name in store.checkpoint_names():
        assert store.storage.exists(f"{name}/manifest.json")
        store.load_checkpoint(name)  # verifies the hashes
    assert store.read_metrics().column("cur_nimg").to_pylist() == [32, 64, 96, 128]
    assert_leaderboard(store)
    # the cluster's auth token is in neither the job's logs nor anything the job wrote (issue 18: secrets)
    token = head.token_file.read_text().strip().encode()
    assert token not in (logs.stdout + logs.stderr + proc.stdout + proc.stderr).encode()
    assert not [key for key, data in s3_bucket.server.objects(s3_bucket.name) if token in data]


def test_stop_a_running_job(head, client_env, tmp_path):
    runs = tmp_path / "runs"  # absolute local folder: fine on this single-node cluster
    job = write_job(tmp_path / "long.yaml", name="long1", overrides=TINY + [
        "total_kimg=50", "checkpoint_every_kimg=25"], resources={"num_workers": 2}, storage={"uri": str(runs)})
    proc = sida(["submit", job, "--address", head.dashboard_url], client_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = json.loads(proc.stdout.strip().splitlines()[-1])["job_id"]
    store = RunStore(Storage(str(runs)).child("long1"))
    deadline = time.time() + 240
    while time.time() < deadline:  # running, and past its first metrics row
        st = json.loads(sida(["jobs", "status", job_id, "--address", head.dashboard_url], client_env).stdout)["status"]
        assert st in ("PENDING", "RUNNING"), (st, head.log_tail())
        if st == "RUNNING" and store.storage.exists("metrics") and store.storage.listdir("metrics"):
            break
        time.sleep(2)
    else:
        pytest.fail("the long job never wrote a metrics row")
    workers = train_worker_pids(head.proc.pid)  # the job's two training workers (earlier jobs' have ended)
    assert len(workers) == 2, workers
    stop = sida(["jobs", "stop", job_id, "--address", head.dashboard_url], client_env)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert json.loads(stop.stdout) == {"job_id": job_id, "stop_requested": True, "status": "STOPPED"}
    rows_at_stop = store.metric_parts()
    deadline = time.time() + 30  # the workers go with the job: Ray kills a stopped driver's actors
    while time.time() < deadline and set(workers) & set(train_worker_pids(head.proc.pid)):
        time.sleep(0.2)
    left = sorted(set(workers) & set(train_worker_pids(head.proc.pid)))
    assert not left, f"training workers {left} still run 30 s after `sida jobs stop` said STOPPED"
    time.sleep(3)
    assert store.metric_parts() == rows_at_stop, "a metric row was written after the job was stopped"
    assert (store.read_status() or {}).get("state") != "finished"
    assert store.read_metrics().column("cur_nimg").to_pylist()[-1] < 50_000


# ----------------------------------------------------------------------------------- refused before submit
def _submit_in_process(args, capsys, monkeypatch, env: dict):
    from pipelines.cli import main

    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


REFUSED = [
    # (id, job fields, needles of the one-line error)
    ("too_many_cpus", {"resources": {"num_workers": 8}, "overrides": TINY + ["batch.total=128"]}, ["resources", "8 worker(s)", "advertises 4 CPUs, 0 GPUs", "1 node"]),  # noqa: E501
    ("gpus_on_a_cpu_cluster", {"resources": {"num_workers": 2, "use_gpu": True}}, ["2 GPUs", "advertises 4 CPUs, 0 GPUs"]),
    ("invalid_config", {"overrides": TINY + ["loss.alpha=abc"]}, ["invalid config", "digits.yaml", "loss.alpha"]),
    ("batch_not_divisible", {"resources": {"num_workers": 3}}, ["batch.total", "divisible"]),
    ("unknown_kind", {"kind": "trian"}, ["kind", "'trian'", "train, sweep, pipeline, evaluate"]),
    ("unknown_key", {"resource": {}}, ["resource", "unknown key", "did you mean 'resources'"]),
    ("relative_storage", {"storage": {"uri": "runs"}}, ["storage.uri 'runs'", "relative", "s3://"]),
    ("missing_config", {"config": "nowhere.yaml"}, ["nowhere.yaml", "does not exist"]),
    ("unset_forward_env", {"forward_env": ["SIDA_SURELY_UNSET_VAR"]}, ["forward_env", "SIDA_SURELY_UNSET_VAR"]),
    # secrets never travel in a runtime_env (Ray logs it in clear on every node and shows it in the dashboard)
    ("secret_in_forward_env", {"forward_env": ["SIDA_CACHE", "AWS_SECRET_ACCESS_KEY"]},
     ["forward_env", "AWS_SECRET_ACCESS_KEY", "in clear", "storage.env"]),
    ("secret_in_env_vars", {"runtime_env": {"env_vars": {"AWS_ACCESS_KEY_ID": "AKIA-x", "RAY_AUTH_TOKEN": "t"}}},
     ["runtime_env.env_vars", "AWS_ACCESS_KEY_ID, RAY_AUTH_TOKEN", "in clear"]),
]


@pytest.mark.parametrize("fields,needles", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_submit_refuses_with_one_line(fields, needles, head, tmp_path, capsys, monkeypatch):
    job = write_job(tmp_path / "job.yaml", **{"name": "never", "storage": {"uri": str(tmp_path / "runs")},
                                              "overrides": TINY, **fields})
    code, out, err = _submit_in_process(["submit", job, "--address", head.dashboard_url], capsys, monkeypatch,
                                        head.client_env)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert code == 2 and out == "" and len(lines) == 1, (code, out, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (tmp_path / "runs").exists()


def test_autoscale_flag_skips_the_capacity_check_only(head, tmp_path, capsys, monkeypatch):
    """--allow-autoscale lets a job larger than the live nodes through the check (it is then refused by nothing
    here; we stop it at once: no autoscaler will ever add 8 CPUs to this head)."""
    from ray_jobs import jobs

    job = write_job(tmp_path / "job.yaml", name="big", overrides=TINY + ["batch.total=128"], resources={"num_workers": 8},
                    storage={"uri": str(tmp_path / "runs")})
    code, out, err = _submit_in_process(["submit", job, "--address", head.dashboard_url, "--allow-autoscale"],
                                        capsys, monkeypatch, head.client_env)
    assert code == 0, err
    assert "--allow-autoscale" in err and "9 CPUs" in err  # 8 workers + 1 scorer
    job_id = json.loads(out)["job_id"]
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_file))
    c = jobs.client(head.dashboard_url)
    jobs.stop(c, job_id)
    assert jobs.wait(c, job_id, timeout_s=60) in ("STOPPED", "FAILED")


@pytest.mark.parametrize("case", ["no_token", "wrong_token"])
def test_token_auth_errors_are_one_line(case, head, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)} if case == "no_token" else {"RAY_AUTH_TOKEN": "not-the-token"}
    code, out, err = _submit_in_process(["jobs", "status", "raysubmit_x", "--address", head.dashboard_url], capsys,
                                        monkeypatch, env)
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("error: Ray cluster at " + head.dashboard_url), err
    assert ("requires a token and none was found" if case == "no_token" else "RAY_AUTH_TOKEN") in err
    assert "ray get-auth-token" in err


def test_unknown_job_and_unreachable_cluster(head, capsys, monkeypatch):
    code, _, err = _submit_in_process(["jobs", "stop", "raysubmit_nosuchjob", "--address", head.dashboard_url],
                                      capsys, monkeypatch, head.client_env)
    assert code == 2 and "raysubmit_nosuchjob" in err and "does not exist" in err and err.count("\n") == 1, err
    from tests.ray_head import free_port

    code, _, err = _submit_in_process(["jobs", "logs", "x", "--address", f"http://127.0.0.1:{free_port()}"],
                                      capsys, monkeypatch, head.client_env)
    assert code == 2 and "cannot reach the Ray Jobs API" in err and err.count("\n") == 1, err
    code, _, err = _submit_in_process(["jobs", "status", "x"], capsys, monkeypatch, {})
    assert code == 2 and "--address" in err and "RAY_ADDRESS" in err, err


# ---------------------------------------------------------------------------------- the spec on its own
def _spec(**fields) -> JobSpec:
    return validate(JobSpec, {"kind": "train", "config": str(CONFIG), **fields}, source="job.yaml")


def test_entrypoints_of_every_kind(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nbase: {CONFIG}\naxes: {{alpha: [0.5, 1.0]}}\nset: {{storage.uri: s3://b/sweeps}}\n")
    train = check_job(_spec(name="r1", overrides=["loss.alpha=1.2", "teacher.network.kwargs={a: 1}"],
                            storage={"uri": "s3://b/runs"}, resources={"num_workers": 2}))
    assert train.entrypoint() == ("sida train digits.yaml --name r1 --set loss.alpha=1.2 --set "
                                  "'teacher.network.kwargs={a: 1}' --set scaling.num_workers=2 --set storage.uri=s3://b/runs")
    assert train.run_uri == "s3://b/runs/r1" and train.request == Request(2, 1.0, 0.0, 0.0, scorer_cpus=1.0)  # + 1 scorer
    assert check_job(_spec(kind="sweep", config=str(sweep))).entrypoint() == "sida sweep sweep.yaml"
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"name: p\nbase: {CONFIG}\nset: {{storage.uri: s3://b/p}}\nstages: [{{name: sid, method: sid}}]\n")
    assert check_job(_spec(kind="pipeline", config=str(pipe), args=["--dry-run"])).entrypoint() == \
        "sida pipeline pipe.yaml --dry-run"
    ev = check_job(_spec(kind="evaluate", config=None, run_uri="s3://b/runs/r1", args=["--best", "--repeats", "3"],
                         resources={"num_workers": 1, "use_gpu": True}))
    assert ev.entrypoint() == "sida evaluate s3://b/runs/r1 --best --repeats 3"
    assert ev.request == Request(1, 1.0, 1.0, 0.0)
    # an elastic train job: [min, max] reaches the run config as a list; the cluster check needs min workers
    elastic = check_job(_spec(name="r2", storage={"uri": "s3://b/runs"}, resources={"num_workers": [1, 2]}))
    assert "--set 'scaling.num_workers=[1,2]'" in elastic.entrypoint()  # shell-quoted
    assert elastic.config.scaling.num_workers == (1, 2) and elastic.request.workers == 1
    with pytest.raises(ConfigError, match=r"resources.num_workers.*1 <= min <= max"):
        _spec(resources={"num_workers": [2, 1]})
    # a sweep / pipeline file is validated like `sida sweep` does it and travels with its base run config
    sw = check_job(_spec(kind="sweep", config=str(sweep)))
    assert sorted(sw.staged) == ["digits.yaml", "sweep.yaml"] and sw.storage_uri == "s3://b/sweeps"
    assert yaml.safe_load(sw.staged["sweep.yaml"])["base"] == "digits.yaml"
    assert sw.staged["digits.yaml"] == CONFIG.read_text()
    assert sw.request == Request(2, 1.0, 0.0, 1.0, scorer_cpus=1.0)  # one trial: driver + 2 workers + scorer
    sweep.write_text(f"name: s\nbase: {CONFIG}\naxes: {{alpha: [0.5, 1.0]}}\n")  # the base's storage: runs
    with pytest.raises(ConfigError, match="storage.uri 'runs' is a relative local path"):
        check_job(_spec(kind="sweep", config=str(sweep)))
    sweep.write_text(f"name: s\nbase: {CONFIG}\naxes: {{alpha: [0.5, abc]}}\nset: {{storage.uri: s3://b/x}}\n")
    with pytest.raises(ConfigError, match="alpha"):
        check_job(_spec(kind="sweep", config=str(sweep)))
    # a train job without a name gets CONFIG_NAME-TIMESTAMP, decided at submission (so it can be printed)
    assert check_job(_spec(storage={"uri": "s3://b/runs"})).name.startswith("digits-")


def test_config_validators_are_the_one_plug_in_point(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("trials: 4\n")
    with pytest.raises(ConfigError) as info:  # the registered SweepConfig validator refuses it, in one line
        check_job(_spec(kind="sweep", config=str(sweep)))
    assert "invalid sweep" in str(info.value) and "trials" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.delitem(CONFIG_VALIDATORS, "sweep")  # a kind without a validator: checked as YAML, with a warning
    assert any("not validated" in w for w in check_job(_spec(kind="sweep", config=str(sweep))).warnings)
    seen = []
    monkeypatch.setitem(CONFIG_VALIDATORS, "sweep", lambda j: seen.append(j.config_path.name))
    job = check_job(_spec(kind="sweep", config=str(sweep)))
    assert seen == ["sweep.yaml"] and not job.warnings


BAD_SPECS = [
    ({"kind": "distill"}, ["kind", "'distill'", "train, sweep, pipeline, evaluate"]),
    ({"kind": "evaluate", "config": None}, ["run_uri is required", "evaluate"]),
    ({"config": None}, ["config is required", "train"]),
    ({"kind": "sweep", "name": "x"}, ["name is only used by kind 'train'"]),
    ({"overrides": ["loss.alpha"]}, ["overrides", "'loss.alpha'", "KEY=VALUE"]),
    ({"resources": {"num_workers": 0}}, ["resources.num_workers", "whole number >= 1 or [min, max]"]),
    ({"name": "a/b"}, ["name", "without slashes"]),
    ({"runtime_env": {"working_dir": "."}}, ["runtime_env", "working_dir", "unknown key"]),
]


@pytest.mark.parametrize("fields,needles", BAD_SPECS, ids=[str(b[0]) for b in BAD_SPECS])
def test_bad_spec_is_one_line(fields, needles):
    with pytest.raises(ConfigError) as info:
        _spec(**fields)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("invalid config job.yaml: "), msg
    for n in needles:
        assert n in msg, (n, msg)


def test_relative_teacher_path_and_local_storage_warning(tmp_path):
    with pytest.raises(ConfigError, match="teacher.path 'teacher.pkl' is a relative local path"):
        check_job(_spec(overrides=["teacher.path=teacher.pkl"], storage={"uri": "s3://b/r"}))
    job = check_job(_spec(storage={"uri": str(tmp_path)}))
    assert any("local folder" in w and "single-node" in w for w in job.warnings)


def test_job_file_paths_are_relative_to_it_and_the_shipped_runtime_env_loads(tmp_path):
    from ray.runtime_env import RuntimeEnv

    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    (jobs_dir / "job.yaml").write_text(f"kind: train\nconfig: {os.path.relpath(CONFIG, jobs_dir)}\n"
                                       f"runtime_env: {os.path.relpath(ROOT / 'cluster' / 'runtime_env.yaml', jobs_dir)}\n")
    spec = load_job_spec(jobs_dir / "job.yaml")
    assert Path(spec.config) == CONFIG.resolve()
    assert spec.runtime_env.env_vars["PYTHONUNBUFFERED"] == "1"
    RuntimeEnv(**spec.runtime_env.model_dump(exclude_none=True))  # and Ray accepts it


def test_check_resources_counts_whole_workers_per_node():
    node8 = {"CPU": 192.0, "GPU": 8.0}
    check_resources(Request(16, 4.0, 1.0, 1.0), [{"CPU": 16.0}, node8, node8], "http://h:8265")
    with pytest.raises(JobError, match=r"16 worker\(s\) x \(4 CPU, 1 GPU\).*advertises 208 CPUs, 8 GPUs on 2 node"):
        check_resources(Request(16, 4.0, 1.0), [{"CPU": 16.0}, node8], "http://h:8265")
    # enough GPUs in total, but no node holds a worker's 100 CPUs next to its GPU
    with pytest.raises(JobError, match=r"0 such worker\(s\) fit"):
        check_resources(Request(2, 100.0, 1.0), [{"CPU": 64.0, "GPU": 1.0}, {"CPU": 64.0, "GPU": 1.0}], "http://h:8265")
    check_resources(Request(0, 0.0, 0.0, 0.0), [], "http://h:8265")  # nothing asked: nothing to refuse
