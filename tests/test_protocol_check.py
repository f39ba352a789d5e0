"""`sida evaluate --protocol-check`: the teacher's own Heun samples scored exactly as the generator's are (same
metrics, protocol, reference, feature spaces and latents), once per evaluation, stored in the run and reused.

The run is the tiny digits one of tests/test_scoring.py (`make_run`) with its teacher copied in, scored with
FD-digits and KID-digits against `sida fid-stats digits --features` statistics; the teacher samples with 2 Heun
steps (3 NFE) so that a teacher score costs about what three generator scores do."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipelines.cli import main
from pipelines.leaderboard import FINAL_SEED0
from ray_jobs.scoring import CheckpointScorer
from sida_core.metrics import digits_feature_space, kernel_inception_distance
from sida_core.metrics.frechet import GaussianReference, stats_from_features
from sida_core.metrics.score import generator_inputs
from sida_core.teacher import heun_sample
from sida_core.training_loop import get_teacher, load_network
from store.reference import read_reference, read_reference_features
from store.storage import Storage

NUM = 100
METRICS = ["fd_digits", "kid_digits"]
EVALUATE = ["--best", "--repeats", "2", "--num-images", str(NUM), "--protocol-check", "--teacher-steps", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with one live-scored checkpoint and its teacher (teacher/), two metrics against stored features."""
    from sida_core.data import load_dataset
    from tests.test_scoring import make_run

    root = tmp_path_factory.mktemp("pcheck")
    reference = root / "digits-8"
    assert main(["fid-stats", "digits", "--out", str(reference), "--features", "--quiet", "--resolution", "8"]) == 0
    storage = Storage(str(root / "runs" / "r"))
    store, cfg = make_run(storage, [64], extra=[f"metric.names=[{','.join(METRICS)}]", f"metric.reference={reference}",
                                                "metric.gallery=0"])
    train_set, _ = load_dataset(cfg.data)
    _, teacher_path = get_teacher(cfg, train_set, torch.device("cpu"), log=lambda m: None)  # (cached by make_run)
    store.ensure_teacher(teacher_path)
    CheckpointScorer().score(storage, "ckpt-000000000064", seed=0)
    return store, reference


def test_the_teacher_value_equals_an_independent_computation(run, capsys):
    store, reference = run
    assert main(["evaluate", store.uri, *EVALUATE]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    teacher = out["teacher"]
    assert {k: teacher[k] for k in ("nfe", "steps", "num_images", "seed", "reused")} == {
        "nfe": 3, "steps": 2, "num_images": NUM, "seed": FINAL_SEED0, "reused": False}
    assert set(teacher["metrics"]) == set(out["metrics"]) == set(METRICS)
    assert teacher["stored"] == store.storage.uri_of(f"evaluate/teacher-clean-3-{NUM}.json")

    # the same latents (the first evaluation seed's), sampled here with sida_core's Heun sampler, through the
    # plain feature and metric functions, against the same stored reference
    net, manifest = load_network(store.storage.path_of("teacher"), "net")
    spec = manifest["network"]
    shape = (spec["img_channels"], spec["img_resolution"], spec["img_resolution"])
    (z, c), = list(generator_inputs(NUM, FINAL_SEED0, shape, spec["label_dim"], batch_size=NUM))
    x = heun_sample(net.eval(), z, c, num_steps=2)
    feats = digits_feature_space().features(x)
    ref = read_reference(str(reference))
    fd = GaussianReference.from_stats(ref.mu, ref.sigma).fd(*stats_from_features(feats))
    kid = kernel_inception_distance(feats, read_reference_features(str(reference)).astype(np.float32), seed=FINAL_SEED0)
    assert teacher["metrics"]["fd_digits"] == pytest.approx(fd, rel=1e-6)
    assert teacher["metrics"]["kid_digits"] == pytest.approx(kid, rel=1e-6, abs=1e-9)
    # ... and it differs from the generator's (the tiny generator and a 3-NFE teacher are different samplers)
    assert teacher["metrics"]["fd_digits"] != pytest.approx(out["metrics"]["fd_digits"]["mean"], rel=1e-3)

    # stderr: the side-by-side table, one line per metric, after the usual headline
    lines = cap.err.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("protocol check:"))
    assert "3 NFE" in lines[head] and "one seed set" in lines[head] and f"{NUM} images" in lines[head]
    table = lines[head + 1: head + 1 + len(METRICS)]
    for name, line in zip(METRICS, table):
        g, t = out["metrics"][name], teacher["metrics"][name]
        assert line.split()[0] == name and f"generator {g['mean']:.4f} ± {g['std']:.4f}" in line
        assert line.rstrip().endswith(f"teacher {t:.4f}")

    with open(store.storage.path_of(f"evaluate/teacher-clean-3-{NUM}.json")) as f:
        stored = json.load(f)
    assert stored["metrics"] == teacher["metrics"] and stored["references"]["fd_digits"] == str(reference)
    assert all(r["kind"] in ("live", "final") for r in store.read_rows())  # no leaderboard row for the teacher


def test_a_second_call_reuses_the_stored_teacher_scores(run, capsys, monkeypatch):
    store, _ = run
    assert main(["evaluate", store.uri, *EVALUATE]) == 0  # (computes them if run alone)
    first = json.loads(capsys.readouterr().out)["teacher"]
    path = store.storage.path_of(f"evaluate/teacher-clean-3-{NUM}.json")
    mtime = os.stat(path).st_mtime_ns

    import sida_core.metrics.score as score

    def no_sampling(*_, **__):
        raise AssertionError("the teacher was sampled again")

    monkeypatch.setattr(score, "teacher_features", no_sampling)
    assert main(["evaluate", store.uri, *EVALUATE]) == 0
    cap = capsys.readouterr()
    again = json.loads(cap.out)["teacher"]
    assert again["reused"] and again["metrics"] == first["metrics"] and os.stat(path).st_mtime_ns == mtime
    assert "stored:" in cap.err
    monkeypatch.undo()

    # stored scores whose inputs no longer hold (here: another seed recorded) are computed again and replaced
    with open(path) as f:
        data = json.load(f)
    data["inputs"]["seed"] += 1
    store.storage.write_json(f"evaluate/teacher-clean-3-{NUM}.json", data)
    assert main(["evaluate", store.uri, *EVALUATE]) == 0
    redone = json.loads(capsys.readouterr().out)["teacher"]
    assert not redone["reused"] and redone["metrics"] == pytest.approx(first["metrics"], rel=1e-9)
    with open(path) as f:
        assert json.load(f)["inputs"]["seed"] == FINAL_SEED0


def test_a_run_without_a_teacher_is_refused_before_any_score(run, tmp_path, capsys):
    import shutil

    store, _ = run
    bare = tmp_path / "bare"
    shutil.copytree(store.storage.path_of(""), bare, ignore=shutil.ignore_patterns("teacher"))
    files = sorted(p for p in bare.rglob("*"))
    assert main(["evaluate", str(bare), *EVALUATE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "no teacher checkpoint" in err, err
    assert sorted(p for p in bare.rglob("*")) == files  # refused before any score was written
