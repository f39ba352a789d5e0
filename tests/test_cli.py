"""The ``sida`` console script, run as a real subprocess (plus a few in-process error-path checks).

Every subprocess gets a private SIDA_CACHE and one CPU thread. Sizes are tiny: an MLP teacher trained for
1 kimg, a 0.128-kimg distillation.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines.cli import build_parser, main

from tests.recipes import CONFIG, ROOT, TINY_DISTILL
from tests.recipes import TINY_TEACHER as TINY

SIDA = Path(sys.executable).parent / "sida"


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update(SIDA_CACHE=str(tmp_path_factory.mktemp("cli-cache")), SIDA_NUM_THREADS="1", OMP_NUM_THREADS="1",
             PYTHONWARNINGS="ignore")
    return e


def sida(args, env, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [str(SIDA)] if SIDA.exists() else [sys.executable, "-m", "pipelines.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd or ROOT,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------- help
def _commands():
    out = [[]]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        out.append([name])
        for a in p._actions:
            if getattr(a, "choices", None) and isinstance(a.choices, dict):
                out += [[name, child] for child in a.choices]
    return out


def test_every_command_is_listed():
    assert sorted(" ".join(c) for c in _commands() if c) == [
        "cluster", "cluster validate", "dataset", "dataset prepare", "dataset stage", "demo", "distill", "evaluate", "export",
        "fid-stats", "generate", "jobs", "jobs logs", "jobs status",
        "jobs stop", "leaderboard", "pipeline", "reference", "reference import", "report", "submit", "sweep", "teacher",
        "teacher import", "teacher sample",
        "teacher train", "train", "validate"]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "sida")
def test_help_exits_zero(command, env):
    proc = sida(command + ["--help"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: sida") and proc.stderr == ""


# ----------------------------------------------------------------------------------------------- validate
def test_validate_good_config(capsys):
    assert main(["validate", str(CONFIG), *sets(["batch.total=256", "batch.per_worker=32"])]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"valid": True, "name": "digits", "method": "sida", "rounds": 4, "total_batch": 256}
    assert captured.err == ""


def test_workers_flag_takes_a_count_or_an_elastic_range(tmp_path):
    from pipelines.train import resolve_run

    args = build_parser().parse_args(["train", str(CONFIG), "--workers", "1-2"])
    assert args.workers == "[1, 2]"
    cfg = resolve_run(str(CONFIG), [f"storage.uri={tmp_path}"], workers=args.workers)[0]
    assert cfg.scaling.num_workers == (1, 2) and cfg.scaling.elastic
    assert resolve_run(str(CONFIG), [f"storage.uri={tmp_path}"], workers="2")[0].scaling.num_workers == 2
    assert list(tmp_path.iterdir()) == []  # resolving writes nothing


def test_validate_bad_config_subprocess(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("lambda_sid: 100.0", "lambda_sdi: 100.0"))
    line = assert_one_line_error(sida(["validate", bad], env), "loss.lambda_sdi", "unknown key", "lambda_sid")
    assert str(bad) in line


@pytest.mark.parametrize("args, needles", [
    (["--set", "batch.per_worker=48"], ["batch.total", "divisible"]),
    (["--set", "method=sid2a"], ["init_generator"]),
    (["--set", "teacher.path=/no/such/teacher"], ["teacher.path", "does not exist"]),
    (["--set", "precision=fp8"], ["precision"]),
    (["--set", "novalue"], ["KEY=VALUE"]),
])
def test_validate_bad_values_in_process(args, needles, capsys):
    assert main(["validate", str(CONFIG), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_validate_missing_and_broken_files(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: config file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: [1, 2\n")
    assert main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not valid YAML" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------- teacher / distill
@pytest.fixture(scope="module")
def trained_teacher(env):
    proc = sida(["teacher", "train", CONFIG, *sets(TINY)], env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return Path(out["teacher"]), proc


def test_teacher_train(trained_teacher, env):
    path, proc = trained_teacher
    assert len(proc.stdout.strip().splitlines()) == 1  # stdout: just the JSON line (logs go to stderr)
    assert path.is_dir() and path.parent == Path(env["SIDA_CACHE"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "teacher" and manifest["network"]["arch"] == "mlp"
    assert "teacher: training mlp" in proc.stderr


def test_teacher_sample_writes_png(trained_teacher, env, tmp_path):
    path, _ = trained_teacher
    png = tmp_path / "grid.png"
    proc = sida(["teacher", "sample", path, "--steps", "3", "--num", "4", "--out", png], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"out": str(png), "nfe": 5}
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 8 and im.size[1] >= 8


def test_teacher_sample_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-such-ckpt"
    assert main(["teacher", "sample", str(missing), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert str(missing) in err and "not a checkpoint directory" in err
    assert not (tmp_path / "x.png").exists()


def test_distill_tiny_run_scores_into_a_run_folder_the_leaderboard_reads(trained_teacher, env, tmp_path):
    run_dir = tmp_path / "run"
    scoring = ["metric.num_images=400", "metric.batch_size=200"]
    proc = sida(["distill", CONFIG, *sets(TINY_DISTILL + scoring), "--run-dir", run_dir, "--score", "--quiet"], env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # one JSON line; log messages go to stderr
    out = json.loads(lines[0])
    assert out["run_dir"] == str(run_dir) and out["kimg"] == 0.128
    assert out["checkpoint"] == str(run_dir / "ckpt-000000000128")
    assert "teacher: reusing" in proc.stderr  # the teacher trained by `sida teacher train` (same cache, same recipe)
    assert (run_dir / "config.json").is_file() and len(list((run_dir / "metrics").iterdir())) == 4
    # the same run folder as `sida train` writes: the leaderboard reads its two live scores, the best is pinned
    proc = sida(["leaderboard", run_dir, "--json"], env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert sorted(r["checkpoint"] for r in rows) == ["ckpt-000000000064", "ckpt-000000000128"]
    assert {r["metric"] for r in rows} == {"fd_digits"} and all(r["value"] > 0 for r in rows)
    best = min(rows, key=lambda r: r["value"])["checkpoint"]
    assert sorted(p.name for p in (run_dir / "pinned").iterdir()) == [best]
    # read-only commands on it need no Ray (the run store is its own Ray-free package)
    code = ("import sys; from pipelines.cli import main; "
            f"rc = [main(['leaderboard', {str(run_dir)!r}, '--json']), "
            f"main(['evaluate', {str(run_dir)!r}, '--best', '--repeats', '2', '--num-images', '200'])]; "
            "print(rc, sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and proc.stderr.strip().splitlines()[-1] == "[0, 0] []", proc.stderr[-2000:]

    # --watch on a finished run: one table with its state, then exit 0
    proc = sida(["leaderboard", run_dir, "--watch", "0.05"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("1 of 1 run(s) ended") == 1 and "finished" in proc.stdout, proc.stdout
    # ... on a run still training (no status.json yet): redrawn until its status appears
    status = (run_dir / "status.json").read_text()
    (run_dir / "status.json").unlink()
    naps: list[float] = []

    def nap(seconds: float) -> None:  # the watcher's sleep: the run "ends" during the second wait
        naps.append(seconds)
        if len(naps) == 2:
            (run_dir / "status.json").write_text(status)

    from pipelines.leaderboard import watch

    with contextlib.redirect_stdout(io.StringIO()) as shown:
        assert watch(str(run_dir), interval=0.5, sleep=nap) == 3
    text = shown.getvalue()
    assert naps == [0.5, 0.5] and text.count("0 of 1 run(s) ended") == 2 and text.count("1 of 1 run(s) ended") == 1
    assert "training" in text and "finished" in text
    proc = sida(["leaderboard", run_dir, "--watch", "2", "--json"], env)
    assert proc.returncode == 2 and "--watch" in proc.stderr and "Traceback" not in proc.stderr

    # every checkpoint damaged: resuming refuses in one line instead of training again from 0 kimg over them
    for ck in run_dir.glob("ckpt-*"):
        data = bytearray((ck / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ck / "state.pt").write_bytes(bytes(data))
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name != "status.json")
    proc = sida(["distill", CONFIG, *sets(TINY_DISTILL + scoring + ["total_kimg=0.256"]), "--run-dir", run_dir,
                 "--quiet"], env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "none of its 2 committed checkpoint(s) verifies" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name != "status.json") == before



def test_sample_from_distill_checkpoint_and_wrong_key(tmp_path, capsys, monkeypatch, env):
    # in-process (cheap): a distill checkpoint made by the engine, sampled with `teacher sample --key generator_ema`
    from pipelines.distill import run_distill, run_store_of
    from schemas.loader import load_run_config

    monkeypatch.setenv("SIDA_CACHE", env["SIDA_CACHE"])
    cfg = load_run_config(CONFIG, TINY_DISTILL + ["total_kimg=0.032"])
    out = run_distill(cfg, run_store_of(cfg, str(tmp_path / "run")), progress=False, log=lambda m: None)
    png = tmp_path / "g.png"
    assert main(["teacher", "sample", out["checkpoint"], "--key", "generator_ema", "--steps", "2", "--num", "4",
                 "--out", str(png)]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(png), "nfe": 3} and png.is_file()
    assert main(["teacher", "sample", out["checkpoint"], "--key", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "'nope'" in err and "generator_ema" in err


# ----------------------------------------------------------------------------------------------- demo
def test_teacher_scores_are_cached_per_seed_next_to_the_teacher(tmp_path, monkeypatch):
    from pipelines.demo import teacher_scores
    from schemas.loader import load_run_config
    from sida_core.data import load_dataset
    from sida_core.metrics import digits_feature_space
    from sida_core.training_loop import get_teacher

    monkeypatch.setenv("SIDA_CACHE", str(tmp_path))
    cfg = load_run_config(CONFIG, TINY + ["metric.num_images=100",
                                         "teacher.sampler_steps=3"])
    train_set, _ = load_dataset(cfg.data)
    teacher, teacher_dir = get_teacher(cfg, train_set, "cpu", log=lambda m: None)
    space = digits_feature_space()
    args = (teacher, teacher_dir, cfg, space, space.stats(train_set.images), (1, 8, 8), 0)
    first = teacher_scores(*args, 2, "cpu")
    assert len(first) == 2 and first[0] != first[1] and all(v > 0 for v in first)
    cache = teacher_dir.parent / f"{teacher_dir.name}.fd_digits.json"
    known = json.loads(cache.read_text())
    assert len(known) == 2
    known[sorted(known)[0]] = 123.0  # a cached score is read back, not recomputed
    cache.write_text(json.dumps(known))
    again = teacher_scores(*args, 3, "cpu")
    assert 123.0 in again and len(again) == 3 and len(json.loads(cache.read_text())) == 3


def test_beats_teacher_needs_the_gap_beyond_two_standard_errors():
    from pipelines.demo import beats_teacher

    teacher = [5.0, 5.2, 4.8, 5.1, 4.9]
    clear = beats_teacher([4.0, 4.2, 3.8, 4.1, 3.9], teacher)
    assert clear["beats_teacher"] and clear["fd_gap"] == pytest.approx(1.0) and clear["fd_gap_se"] == pytest.approx(0.1)
    # lower mean, but within two standard errors: not a win
    assert not beats_teacher([4.85, 5.05, 4.65, 4.95, 4.75], teacher)["beats_teacher"]
    assert not beats_teacher([6.0, 6.1, 5.9], teacher)["beats_teacher"]
    # one teacher seed: its spread is taken as the generator's (pooled: same estimator, same image count)
    one = beats_teacher([4.0, 4.2, 3.8, 4.1, 3.9], [5.0])
    assert one["beats_teacher"] and one["fd_gap_se"] == pytest.approx(0.025 ** 0.5 * (1 / 5 + 1) ** 0.5, abs=1e-4)
    assert not beats_teacher([4.0, 4.2, 3.8, 4.1, 3.9], [4.3])["beats_teacher"]
    with pytest.raises(ValueError, match="two generator seeds"):
        beats_teacher([4.0], teacher)


def test_demo_end_to_end_tiny(env, tmp_path):
    """The README's main job on a tiny budget: same code path, last stdout line is the summary JSON."""
    out = tmp_path / "demo"
    proc = sida(["demo", "--out", out, *sets(TINY_DISTILL + ["metric.num_images=200", "teacher.sampler_steps=4"])], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("teacher_fd", "teacher_nfe", "generator_fd", "generator_nfe", "seconds", "real_fd_floor"):
        assert key in summary, key
    assert summary["teacher_nfe"] == 7 and summary["generator_nfe"] == 1
    assert summary["generator_fd"] > 0 and summary["teacher_fd"] > 0
    assert summary["teacher_repeats"] == 1 and summary["repeats"] == 10
    # the verdict is the two means' gap against its standard error, not one score
    assert summary["beats_teacher"] == (summary["fd_gap"] > 2 * summary["fd_gap_se"])
    assert summary["fd_gap"] == pytest.approx(summary["teacher_fd"] - summary["generator_fd"], abs=2e-4)
    for png in ("data.png", "teacher_samples.png", "generator_samples.png", "fd_vs_kimg.png"):
        assert (out / png).stat().st_size > 0, png
    assert Image.open(out / "generator_samples.png").size[0] >= 32
    # the distillation ran on Ray Train with the preset's 2 workers, into local storage
    from store.run_store import RunStore
    from store.storage import Storage

    store = RunStore(Storage(summary["run_uri"]))
    assert summary["workers"] == 2 and [e["workers"] for e in store.events() if e["kind"] == "start"] == [2]
    assert store.read_metrics().num_rows >= 4 and store.read_status()["state"] == "finished"
    # every checkpoint was scored by the asynchronous scorers; the best was pinned and re-scored with fresh seeds
    live = [r for r in store.read_rows() if r["kind"] == "live"]
    assert summary["scored_checkpoints"] == len(live) == len(store.checkpoint_names()) == 2
    best = min(live, key=lambda r: r["value"])
    assert store.pinned() == [best["checkpoint"]] and summary["best_kimg"] == best["kimg"]
    finals = [r["value"] for r in store.read_rows() if r["kind"] == "final"]
    assert len(finals) == summary["repeats"] and summary["generator_fd"] == pytest.approx(sum(finals) / len(finals), abs=1e-4)


# ----------------------------------------------------------------------------------------------- train (errors before Ray starts)
@pytest.mark.parametrize("args, needles", [
    (["train"], ["give a run config", "--resume"]),
    (["train", "--resume", "nope"], ["expected a run folder STORAGE_URI/RUN_NAME"]),
    (["train", str(CONFIG), "--set", "storage.uri=gs://bucket/x"], ["storage.uri", "s3://BUCKET/PREFIX"]),
    (["train", str(CONFIG), "--set", "storage.uri=s3://b", "--set", "storage.endpoint_url=127.0.0.1:9000"],
     ["storage.endpoint_url", "http://"]),
    (["train", str(CONFIG), "--workers", "3"], ["batch.total (128)", "scaling.num_workers"]),
    (["train", str(CONFIG), "--set", "storage.uri=s3://no-such-bucket/x", "--set", "storage.endpoint_url=http://127.0.0.1:1",
      "--set", "storage.retry_attempts=1"], ["object store http://127.0.0.1:1", "no-such-bucket"]),
])
def test_train_bad_input_is_one_line(args, needles, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.mark.parametrize("args, needles", [
    (["train", str(CONFIG), "--workers", "0"], ["--workers", "integer >= 1", "got 0"]),
    (["evaluate", "runs/x", "--best", "--num-images", "1"], ["--num-images", "integer >= 2"]),
    (["evaluate", "runs/x", "--best", "--repeats", "abc"], ["--repeats", "expected an integer", "'abc'"]),
    (["evaluate", "s3://", "--best"], ["s3://", "needs a bucket name"]),
    (["leaderboard", "gs://b/x"], ["unsupported scheme 'gs://'"]),
    (["leaderboard", "s3://"], ["needs a bucket name"]),
    (["report", "gs://b/x", "--out", "rep"], ["unsupported scheme 'gs://'"]),
    (["leaderboard", "s3://b/x", "--endpoint-url", "ftp://h"], ["storage.endpoint_url", "http://"]),
    (["teacher", "sample", "ckpt", "--steps", "0"], ["--steps", "integer >= 1"]),
    (["teacher", "sample", "ckpt", "--steps", "-3"], ["--steps", "integer >= 1"]),
    (["teacher", "sample", "ckpt", "--num", "0"], ["--num", "integer >= 1"]),
    (["teacher", "sample", "ckpt", "--out", "grid"], ["--out", ".png", "'grid'"]),
    (["validate", str(CONFIG), "--set", "data.resolution=10"], ["data.resolution=10", "multiple of 8"]),
    (["validate", str(CONFIG), "--set", "teacher.network.kwargs.channel_mult=[1,2,2,2,2]"],
     ["teacher.network", "8x8x1", "not divisible"]),
    (["validate", str(CONFIG), "--set", "teacher.network.kwargs.model_chanels=16"],
     ["teacher.network", "unexpected keyword argument 'model_chanels'"]),
    (["distill", str(CONFIG), "--set", "teacher.network.kwargs.model_chanels=16", "--quiet"],
     ["teacher.network", "'model_chanels'"]),
    (["train", str(CONFIG), "--set", "teacher.network.kwargs.channel_mult=[1,2,2,2,2]"], ["teacher.network", "not divisible"]),
])
def test_bad_arguments_end_in_one_line_exit_2_and_write_nothing(args, needles, tmp_path, monkeypatch, capsys):
    """Argument errors (argparse's own, one line like every refusal) and checks before any work: exit 2, the line
    names the option and what was expected, no traceback, nothing created in the working folder."""
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse: usage, then one "error:" line
        code = exc.code
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and "error: " in last, err
    for n in needles:
        assert n in last, (n, last)
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_an_existing_run_and_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "config.json").write_text("{}")
    assert main(["train", str(CONFIG), "--name", "r1", "--set", f"storage.uri={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and f"--resume {tmp_path / 'runs' / 'r1'}" in err
    assert main(["train", "--resume", str(tmp_path / "runs" / "r2")]) == 2
    assert "no config.json (not a sida run folder)" in capsys.readouterr().err


def test_distill_score_without_a_metric_is_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["distill", str(CONFIG), *[x for s in TINY_DISTILL for x in ("--set", s)], "--set", "metric.enabled=false",
            "--run-dir", str(run_dir), "--score", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--score" in err and "metric.enabled" in err
    assert not run_dir.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs to fill up (needs root or CAP_SYS_ADMIN; skipped, visibly, where mounting is refused)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): full-disk test not run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_a_checkpoint_write_is_one_line_and_the_previous_checkpoint_stays(trained_teacher, env,
                                                                                           small_disk):
    """The run folder on a small tmpfs that fills up (a filler file leaves 64 KiB: room for metric rows, not for a
    checkpoint) once the first checkpoint is committed: `sida distill` stops in one line, the first checkpoint still
    verifies, no temporary file is left behind, and the same command, with space again, resumes from it."""
    import threading
    import time

    from sida_core.checkpoint import verify_checkpoint

    run_dir, filler = small_disk / "run", small_disk / "filler"
    first = run_dir / "ckpt-000000000064"
    stop = threading.Event()

    def fill_after_first_checkpoint() -> None:
        while not stop.is_set() and not (first / "manifest.json").exists():
            time.sleep(0.005)
        if stop.is_set():
            return
        st = os.statvfs(small_disk)
        with open(filler, "wb") as f:
            f.truncate(0)
            os.posix_fallocate(f.fileno(), 0, max(0, st.f_bavail * st.f_frsize - 64 * 1024))

    filling = threading.Thread(target=fill_after_first_checkpoint)
    filling.start()
    cmd = ["distill", CONFIG, *sets(TINY_DISTILL + ["total_kimg=0.192"]), "--run-dir", run_dir, "--quiet"]
    try:
        proc = sida(cmd, env)
    finally:
        stop.set()
        filling.join()
    assert filler.exists(), "the disk was never filled: the run ended before its first checkpoint was seen"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]  # after the run's own log lines, one error line
    assert line.startswith("error: ") and "No space left on device" in line and str(run_dir) in line, proc.stderr
    assert "ckpt-000000000128/state.pt" in line, line  # the write that failed is named: the checkpoint's
    assert verify_checkpoint(first)["cur_nimg"] == 64  # the previous checkpoint is intact
    assert not (run_dir / "ckpt-000000000128" / "manifest.json").exists()  # the cut one was never committed
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]  # no temporary left behind
    filler.unlink()
    proc = sida(cmd, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["kimg"] == 0.192
    assert verify_checkpoint(run_dir / "ckpt-000000000192")["cur_nimg"] == 192
