"""The bad-input corpus: every command, given input it must refuse, answers the one way the CLI refuses.

Each case runs ``sida`` in this process (``pipelines.cli.main``) and asserts the standard: exit status 2, exactly
one non-empty stderr line, starting with ``error:`` and naming what was wrong, no traceback anywhere, and nothing
written (the case's working folder and the shared fixtures hold the same files with the same bytes afterwards, and
the output it names does not exist). Ray must never start: commands that use it refuse before (``connect`` is
replaced by a tripwire). The fixtures are one tiny ``sida distill`` run (seconds) and small hand-made files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main

from tests.recipes import CONFIG, TINY_DISTILL


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _png(path: Path, w: int = 8, h: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, str]:
    """Paths of the inputs the cases refuse, by name (``{name}`` in a case's arguments)."""
    root = tmp_path_factory.mktemp("bad-input")
    run = root / "distill-run"  # a finished one-process run: config.json, teacher, 2 checkpoints, events
    assert main(["distill", str(CONFIG), *sets(TINY_DISTILL), "--run-dir", str(run), "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())

    runs = root / "runs"
    (runs / "truncated").mkdir(parents=True)
    (runs / "truncated" / "config.json").write_text((run / "config.json").read_text()[:200])
    (runs / "no-sections").mkdir()
    (runs / "no-sections" / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                                   if k not in ("loss", "storage")}))
    (runs / "not-a-run").mkdir()
    shutil.copytree(run, runs / "exists")
    shutil.copytree(run, runs / "no-teacher", ignore=shutil.ignore_patterns("teacher"))  # for --protocol-check
    damaged = root / "damaged-run"  # every committed checkpoint fails its hash
    shutil.copytree(run, damaged)
    for ck in damaged.glob("ckpt-*"):
        data = bytearray((ck / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ck / "state.pt").write_bytes(bytes(data))

    ref = root / "ref-truncated"  # reference statistics whose manifest.json was cut short
    ref.mkdir()
    (ref / "stats.npz").write_bytes(b"PK")
    (ref / "manifest.json").write_text('{"format": "sida-fid-reference", "metric": "fd_di')
    (root / "notes.txt").write_text("not statistics\n")
    (root / "fake.npz").write_text("not a zip\n")
    (root / "a-file").write_text("in the way\n")

    bad_img = root / "img-undecodable"
    for i in range(3):
        _png(bad_img / f"img{i}.png")
    (bad_img / "broken.png").write_bytes(b"not a png at all")
    png = (bad_img / "img0.png").read_bytes()
    _zip(root / "undecodable.zip", {"a.png": png, "b.png": b"\x89PNG but cut"})
    labels = {"labels": [["a.png", 1, 2], ["b.png", 0]]}
    _zip(root / "bad-labels.zip", {"a.png": png, "b.png": png, "dataset.json": json.dumps(labels).encode()})
    wide = root / "img-nonsquare"
    _png(wide / "ok.png")
    _png(wide / "wide.png", w=12, h=8)

    base = CONFIG.resolve()
    (root / "sweep-sid2a.yaml").write_text(f"name: s1\nbase: {base}\nsearch: grid\naxes:\n  method: [sid, sida, sid2a]\n"
                                           f"set:\n  storage.uri: {root / 'sweeps'}\n")
    (root / "sweep-axis.yaml").write_text(f"name: s2\nbase: {base}\naxes:\n  alpah: [1.0]\n"
                                          f"set:\n  storage.uri: {root / 'sweeps'}\n")
    (root / "sweep-alpha.yaml").write_text(f"name: s3\nbase: {base}\naxes:\n  alpha: [1.0, 1.2]\n"
                                           f"set:\n  storage.uri: {root / 'sweeps'}\n")
    (root / "pipeline.yaml").write_text(f"name: p1\nbase: {base}\nset:\n  storage.uri: {root / 'pipelines'}\n"
                                        "stages:\n  - name: a\n    method: sida\n")
    (root / "pipelines" / "p1").mkdir(parents=True)
    (root / "pipelines" / "p1" / "pipeline.json").write_text('{"name": "p1", "stages": {')
    (root / "empty.yaml").write_text("")
    (root / "dup.yaml").write_text(CONFIG.read_text() + "\nseed: 1\nseed: 2\n")
    (root / "folder.yaml").mkdir()
    (root / "state.pt").write_bytes(b"\0" * 16)
    out = {k: str(v) for k, v in dict(root=root, run=run, runs=runs, damaged=damaged, ref=ref, bad_img=bad_img,
                                      wide=wide).items()}
    out["config"] = str(CONFIG)
    return out


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder below ``roots``: files by content hash (a rewrite of the same bytes is no write)."""
    seen = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            seen[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


TINY = sets(TINY_DISTILL)
DATA = sets(["teacher.path={run}/teacher", "metric.enabled=false", "data.channels=3"])  # user images need both
C = "{config}"
# (id, arguments ({name}: a fixture path; TINY: the tiny distill recipe; DATA: what user images need), words the
# error line must hold, the output the command would have written, relative to its working folder)
CASES = [
    # --- validate: the config file and its values
    ("validate-missing-file", ["validate", "nope.yaml"], ["config file", "nope.yaml", "does not exist"], None),
    ("validate-folder", ["validate", "{root}/folder.yaml"], ["is a directory"], None),
    ("validate-empty", ["validate", "{root}/empty.yaml"], ["empty"], None),
    ("validate-duplicate-key", ["validate", "{root}/dup.yaml"], ["duplicate key 'seed'"], None),
    ("validate-not-a-mapping", ["validate", "{root}/notes.txt"], ["mapping"], None),
    ("validate-nan", ["validate", C, "--set", "loss.alpha=nan"], ["loss.alpha"], None),
    ("validate-inf", ["validate", C, "--set", "optimizer.lr_psi=inf"], ["optimizer.lr_psi"], None),
    ("validate-unknown-key", ["validate", C, "--set", "loss.lambda_sdi=1"], ["loss.lambda_sdi", "unknown key"], None),
    ("validate-set-no-value", ["validate", C, "--set", "novalue"], ["KEY=VALUE"], None),
    ("validate-absurd-resolution", ["validate", C, "--set", "data.resolution=100000"], ["data.resolution"], None),
    ("validate-digits-not-x8", ["validate", C, "--set", "data.resolution=12"], ["data.resolution=12", "multiple of 8"],
     None),
    ("validate-kwargs-typo", ["validate", C, "--set", "teacher.network.kwargs.model_chanels=16"],
     ["teacher.network", "'model_chanels'"], None),
    ("validate-sid2a-no-init", ["validate", C, "--set", "method=sid2a"], ["init_generator"], None),
    # --- train: refused before Ray starts
    ("train-no-config", ["train"], ["give a run config"], None),
    ("train-workers-0", ["train", C, "--workers", "0"], ["--workers", "integer >= 1"], None),
    ("train-workers-reversed-range", ["train", C, "--workers", "2-1"], ["scaling.num_workers", "min <= max"], None),
    ("train-workers-bad-range", ["train", C, "--workers", "1-x"], ["--workers", "expected an integer"], None),
    ("train-gs", ["train", C, "--set", "storage.uri=gs://b/x"], ["storage.uri", "gs://"], None),
    ("train-s3-no-bucket", ["train", C, "--set", "storage.uri=s3://"], ["bucket"], None),
    ("train-bad-name", ["train", C, "--name", "a/b", "--set", "storage.uri=runs"], ["--name 'a/b'"], "runs"),
    ("train-exists", ["train", C, "--name", "exists", "--set", "storage.uri={runs}"], ["already exists", "--resume"],
     None),
    ("train-resume-not-a-run", ["train", "--resume", "{runs}/not-a-run"], ["no config.json"], None),
    ("train-resume-truncated-config", ["train", "--resume", "{runs}/truncated"],
     ["truncated/config.json", "not valid JSON"], None),
    ("train-resume-missing-sections", ["train", "--resume", "{runs}/no-sections"],
     ["no-sections/config.json", "missing the loss, storage sections"], None),
    ("train-resume-distill-run", ["train", "--resume", "{run}"], ["sida distill", "--run-dir"], None),
    ("train-reference-truncated-manifest", ["train", C, "--set", "metric.reference={ref}", "--set", "storage.uri=runs"],
     ["metric.reference", "ref-truncated/manifest.json", "not valid JSON"], "runs"),
    ("train-reference-text-file", ["train", C, "--set", "metric.reference={root}/notes.txt", "--set",
                                   "storage.uri=runs"], ["metric.reference", "notes.txt", "not a .npz"], "runs"),
    ("train-reference-npz-not-zip", ["train", C, "--set", "metric.reference={root}/fake.npz", "--set",
                                     "storage.uri=runs"], ["metric.reference", "fake.npz", "not an .npz"], "runs"),
    ("train-kwargs-typo", ["train", C, "--set", "teacher.network.kwargs.model_chanels=16", "--set", "storage.uri=runs"],
     ["teacher.network"], "runs"),
    # --- distill (one process)
    ("distill-every-checkpoint-damaged", ["distill", C, "TINY", "--run-dir", "{damaged}", "--quiet"],
     ["none of its 2 committed checkpoint(s) verifies"], None),
    ("distill-score-without-metric", ["distill", C, "TINY", "--set", "metric.enabled=false", "--run-dir", "run",
                                      "--score", "--quiet"], ["--score", "metric.enabled"], "run"),
    ("distill-gs-run-dir", ["distill", C, "--run-dir", "gs://b/x"], ["gs://"], None),
    ("distill-undecodable-image", ["distill", C, "TINY", "DATA", "--set", "data.kind=folder", "--set",
                                   "data.path={bad_img}", "--run-dir", "run", "--quiet"],
     ["broken.png", "cannot decode image", "PNG or JPEG"], "run"),
    ("distill-nonsquare-image", ["distill", C, "TINY", "DATA", "--set", "data.kind=folder", "--set", "data.path={wide}",
                                 "--run-dir", "run", "--quiet"], ["wide.png is 12x8", "square"], "run"),
    ("distill-bad-dataset-json", ["distill", C, "TINY", "DATA", "--set", "data.kind=zip", "--set",
                                  "data.path={root}/bad-labels.zip", "--run-dir", "run", "--quiet"],
     ["bad-labels.zip:dataset.json", "expected EDM format", "labels[0]"], "run"),
    # --- sweep / pipeline
    ("sweep-missing-file", ["sweep", "nope.yaml"], ["nope.yaml"], None),
    ("sweep-sid2a", ["sweep", "{root}/sweep-sid2a.yaml"], ["sid2a", "sida pipeline", "init_from"], None),
    ("sweep-unknown-axis", ["sweep", "{root}/sweep-axis.yaml"], ["alpah"], None),
    ("sweep-reference-text-file", ["sweep", "{root}/sweep-alpha.yaml", "--set", "metric.reference={root}/notes.txt"],
     ["metric.reference", "notes.txt"], None),
    ("pipeline-truncated-state", ["pipeline", "{root}/pipeline.yaml"], ["p1/pipeline.json", "not valid JSON"], None),
    ("pipeline-stop-after-unknown", ["pipeline", "{root}/pipeline.yaml", "--stop-after", "zz"], ["--stop-after 'zz'"],
     None),
    # --- evaluate / leaderboard / report
    ("evaluate-num-images-0", ["evaluate", "{run}", "--best", "--num-images", "0"], ["--num-images"], None),
    ("evaluate-num-images-1", ["evaluate", "{run}", "--best", "--num-images", "1"], ["--num-images", ">= 2"], None),
    ("evaluate-which-checkpoint", ["evaluate", "{run}"], ["--best", "--checkpoint"], None),
    ("evaluate-no-scores", ["evaluate", "{run}", "--best"], ["no scored checkpoint"], None),
    ("evaluate-s3-no-bucket", ["evaluate", "s3://", "--best"], ["bucket"], None),
    ("evaluate-teacher-steps-0", ["evaluate", "{run}", "--best", "--protocol-check", "--teacher-steps", "0"],
     ["--teacher-steps", "integer >= 1"], None),
    ("evaluate-teacher-steps-alone", ["evaluate", "{run}", "--best", "--teacher-steps", "2"],
     ["--teacher-steps", "--protocol-check"], None),
    ("evaluate-protocol-check-no-teacher", ["evaluate", "{runs}/no-teacher", "--best", "--protocol-check"],
     ["no-teacher", "no teacher checkpoint", "--protocol-check"], None),
    ("leaderboard-gs", ["leaderboard", "gs://b/x"], ["gs://"], None),
    ("leaderboard-top-0", ["leaderboard", "{run}", "--top", "0"], ["--top"], None),
    ("leaderboard-watch-json", ["leaderboard", "{run}", "--watch", "1", "--json"], ["--watch"], None),
    ("leaderboard-no-runs", ["leaderboard", "{runs}/not-a-run"], ["no sida run found"], None),
    ("report-gs", ["report", "gs://b/x", "--out", "rep"], ["gs://"], "rep"),
    ("report-no-scores", ["report", "{run}", "--out", "rep"], ["no scored checkpoint"], "rep"),
    # --- fid-stats / demo: validated before the output folder is made
    ("fid-stats-no-dataset", ["fid-stats", "nope", "--out", "stats"], ["nope"], "stats"),
    ("fid-stats-max-images-1", ["fid-stats", "digits", "--out", "stats", "--max-images", "1"], ["--max-images"],
     "stats"),
    ("fid-stats-undecodable-zip-member", ["fid-stats", "{root}/undecodable.zip", "--out", "stats", "--resolution", "8",
                                          "--quiet"], ["undecodable.zip:b.png", "cannot decode"], "stats"),
    ("fid-stats-out-is-a-file", ["fid-stats", "digits", "--out", "{root}/a-file"], ["--out", "a-file"], None),
    ("fid-stats-legacy-digits", ["fid-stats", "digits", "--out", "stats", "--protocol", "legacy_tensorflow"],
     ["--protocol legacy_tensorflow", "fd_digits", "'clean' mode only"], "stats"),
    ("fid-stats-dinov2-no-weights", ["fid-stats", "digits", "--out", "stats", "--metric", "fd_dinov2"],
     ["--dinov2 PATH"], "stats"),
    ("fid-stats-dinov2-missing-weights", ["fid-stats", "digits", "--out", "stats", "--metric", "fd_dinov2",
                                          "--dinov2", "{root}/nope.pth"], ["nope.pth", "no such file"], "stats"),
    ("reference-import-no-file", ["reference", "import", "nope.npz", "--out", "stats", "--resolution", "32"],
     ["nope.npz", "no such file"], "stats"),
    ("reference-import-not-stats", ["reference", "import", "{root}/a-file", "--out", "stats", "--resolution", "32"],
     ["expected EDM's"], "stats"),
    ("demo-bad-resolution", ["demo", "--out", "demo", "--set", "data.resolution=12"], ["data.resolution"], "demo"),
    ("demo-kwargs-typo", ["demo", "--out", "demo", "--set", "teacher.network.kwargs.model_chanels=16"],
     ["teacher.network"], "demo"),
    ("demo-missing-config", ["demo", "--config", "nope.yaml", "--out", "demo"], ["nope.yaml"], "demo"),
    # --- teacher sample / import
    ("teacher-sample-steps-0", ["teacher", "sample", "ckpt", "--steps", "0"], ["--steps", "integer >= 1"], None),
    ("teacher-sample-num-abc", ["teacher", "sample", "ckpt", "--num", "abc"], ["--num", "'abc'"], None),
    ("teacher-sample-jpg", ["teacher", "sample", "{run}/teacher", "--out", "x.jpg"], ["--out", ".png"], "x.jpg"),
    ("teacher-sample-missing", ["teacher", "sample", "nope", "--out", "x.png"], ["nope"], "x.png"),
    ("teacher-import-state-dict-no-config", ["teacher", "import", "{root}/state.pt", "--out", "t"], ["--config"], "t"),
    ("teacher-import-unknown-type", ["teacher", "import", "{root}/notes.txt", "--config", C, "--out", "t"],
     ["notes.txt", "unknown file type"], "t"),
    # --- export / generate
    ("export-bad-extension", ["export", "{run}", "--checkpoint", "latest", "--out", "g.txt"], ["--format", "g.txt"],
     "g.txt"),
    ("export-no-such-checkpoint", ["export", "{run}", "--checkpoint", "nope", "--out", "g.pt"], ["no such checkpoint"],
     "g.pt"),
    ("export-not-a-run", ["export", "{runs}/not-a-run", "--checkpoint", "latest", "--out", "g.pt"], ["not a run"],
     "g.pt"),
    ("generate-png-file", ["generate", "{run}", "--checkpoint", "latest", "--num", "2", "--out", "x.png"],
     ["--out", "FILE.npz"], "x.png"),
    ("generate-num-0", ["generate", "{run}", "--checkpoint", "latest", "--num", "0", "--out", "imgs"], ["--num"],
     "imgs"),
    ("generate-seeds-downwards", ["generate", "{run}", "--checkpoint", "latest", "--seeds", "5-1", "--out", "imgs"],
     ["--seeds"], "imgs"),
    ("generate-device-tpu", ["generate", "{run}", "--checkpoint", "latest", "--num", "2", "--device", "tpu", "--out",
                             "imgs"], ["--device"], "imgs"),
    # --- jobs, cluster, dataset, the command line itself
    ("submit-missing-file", ["submit", "nope.yaml"], ["nope.yaml"], None),
    ("submit-not-a-mapping", ["submit", "{root}/notes.txt"], ["mapping"], None),
    ("jobs-status-no-id", ["jobs", "status"], ["job_id"], None),
    ("jobs-logs-no-id", ["jobs", "logs"], ["job_id"], None),
    ("jobs-stop-bad-timeout", ["jobs", "stop", "x", "--timeout", "soon"], ["--timeout"], None),
    ("teacher-train-missing-config", ["teacher", "train", "nope.yaml"], ["nope.yaml"], None),
    ("dataset-stage-missing", ["dataset", "stage", "nope"], ["nope"], None),
    ("cluster-validate-not-a-mapping", ["cluster", "validate", "{root}/notes.txt"], ["mapping"], None),
    ("dataset-prepare-missing-src", ["dataset", "prepare", "nope", "--out", "ds"], ["nope"], "ds"),
    ("unknown-command", ["trian"], ["invalid choice: 'trian'"], None),
    ("unknown-option", ["validate", C, "--sett", "x=1"], ["--sett"], None),
]


def _argv(args: list[str], fx: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        out += TINY if arg == "TINY" else [a.format(**fx) for a in (DATA if arg == "DATA" else [arg])]
    return out


@pytest.fixture
def no_ray(monkeypatch):
    """A tripwire: a case that gets as far as starting Ray fails (the refusal must come first)."""
    import ray_jobs.cluster

    def connect(*_, **__):
        raise AssertionError("Ray was started: the refusal must come before it")

    monkeypatch.setattr(ray_jobs.cluster, "connect", connect)


@pytest.mark.parametrize("args, needles, out", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, needles, out, fx, tmp_path, monkeypatch, capsys, no_ray):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, Path(fx["root"]))
    try:
        code = main(_argv(args, fx))
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for n in needles:
        assert n.format(**fx) in lines[0], (n, lines[0])
    assert snapshot(tmp_path, Path(fx["root"])) == before
    if out is not None:
        assert not (tmp_path / out).exists()


def test_the_corpus_covers_every_command():
    from tests.test_cli import _commands

    commands = [c for c in _commands() if c]
    leaves = [c for c in commands if not any(len(d) > len(c) and d[:len(c)] == c for d in commands)]
    missing = [" ".join(leaf) for leaf in leaves if not any(case[1][:len(leaf)] == leaf for case in CASES)]
    assert not missing, missing
    assert len(CASES) >= 40
