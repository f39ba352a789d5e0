"""Several metrics from one set of generated images (metric.names): reference features stored by `sida fid-stats
--features`, KID and precision / recall against them, one leaderboard row per metric, ranked the right way."""
from __future__ import annotations

import json
import shutil
import typing

import numpy as np
import pytest

from pipelines.cli import main
from ray_jobs.scoring import CheckpointScorer
from schemas.leaderboard import HIGHER_IS_BETTER
from schemas.loader import ConfigError, load_run_config
from schemas.run import METRIC_SPACES, MetricConfig, MetricName
from sida_core.metrics import digits_feature_space, kernel_inception_distance, precision_recall
from sida_core.metrics.catalog import CATALOG
from sida_core.metrics.frechet import GaussianReference, stats_from_features
from sida_core.metrics.score import generator_features
from sida_core.training_loop import load_network
from store.reference import read_reference, read_reference_features
from store.run_store import RunStore
from store.storage import Storage
from tests.recipes import CONFIG

DIGITS_ALL = ["fd_digits", "kid_digits", "precision_digits", "recall_digits"]


def test_the_schema_knows_the_catalog():
    """schemas import no torch, so they hold a copy of the catalog's names, spaces and directions: equal."""
    assert METRIC_SPACES == {name: m.space for name, m in CATALOG.items()}
    assert set(typing.get_args(MetricName)) == set(CATALOG)
    assert HIGHER_IS_BETTER == {name for name, m in CATALOG.items() if m.higher_is_better}


@pytest.mark.parametrize("fields, match", [
    ({"names": ["fd_digits", "fd_digits"]}, "twice"),
    ({"name": "fd_digits", "names": ["kid_digits"]}, "must be one of metric.names"),
    ({"names": ["fid_inception", "fd_dinov2"], "reference": "r"}, "metric.dinov2 is required"),
    ({"names": ["fid_inception", "fd_dinov2"], "reference": "r", "dinov2": "w.pth"}, "metric.references.fd_dinov2"),
    ({"names": ["fd_digits", "kid_digits"], "protocol": "legacy_tensorflow"}, "fd_digits is defined in 'clean' mode"),
    ({"names": ["fd_dinov2"], "reference": "r", "dinov2": "w.pth", "protocol": "legacy_tensorflow"},
     "applies to Inception metrics"),
    ({"names": ["fd_dinov2"], "dinov2": "w.pth"}, "metric.reference is required"),
    ({"names": ["precision_digits"]}, "Input should be 'fd_digits'"),  # ranking needs a distance
])
def test_bad_metric_lists_are_one_clear_error(fields, match):
    with pytest.raises(ValueError, match=match):
        MetricConfig(**fields)


def test_names_default_the_ranking_metric_and_keep_it_first():
    m = MetricConfig(names=["kid_digits", "fd_digits"], name="fd_digits")
    assert m.metric_names == ["fd_digits", "kid_digits"]
    assert MetricConfig(names=["fid_inception", "is_inception"], reference="r").name == "fid_inception"
    assert MetricConfig().metric_names == ["fd_digits"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`sida fid-stats digits --features` at the test runs' resolution."""
    out = tmp_path_factory.mktemp("ref") / "digits-8"
    assert main(["fid-stats", "digits", "--out", str(out), "--features", "--quiet", "--resolution", "8"]) == 0
    return out


def test_fid_stats_features_are_stored_in_checked_float16_shards(reference, tmp_path):
    ref = read_reference(str(reference))
    feats = read_reference_features(str(reference))
    assert feats.dtype == np.float16 and feats.shape == (ref.manifest["num_images"], ref.feature_dim)
    assert ref.manifest["features"]["count"] == len(feats)
    # the stored mu is of the float32 features; the float16 copy agrees to its precision
    assert np.allclose(feats.astype(np.float64).mean(0), ref.mu, atol=1e-2 * (1 + np.abs(ref.mu).max()))
    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged)
    shard = damaged / "features-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256 does not match"):
        read_reference_features(str(damaged))
    bare = tmp_path / "no-features"
    assert main(["fid-stats", "digits", "--out", str(bare), "--quiet", "--resolution", "8"]) == 0
    with pytest.raises(ValueError, match="--features"):
        read_reference_features(str(bare))


@pytest.fixture(scope="module")
def scored(reference, tmp_path_factory):
    """A digits run with one checkpoint, scored in-process with four metrics against the stored reference."""
    from tests.test_scoring import make_run

    storage = Storage(str(tmp_path_factory.mktemp("runs") / "many"))
    extra = [f"metric.names=[{','.join(DIGITS_ALL)}]", f"metric.reference={reference}", "metric.gallery=0"]
    store, cfg = make_run(storage, [64], extra=extra)
    row = CheckpointScorer().score(storage, "ckpt-000000000064", seed=3)
    return store, cfg, row


def test_one_row_per_metric_each_equal_to_an_independent_computation(scored, reference, tmp_path):
    store, cfg, row = scored
    rows = {r["metric"]: r for r in store.read_rows()}
    assert set(rows) == set(DIGITS_ALL) and row["metric"] == "fd_digits" and set(row["also"]) == set(DIGITS_ALL[1:])
    assert {r["seed"] for r in rows.values()} == {3} and {r["num_images"] for r in rows.values()} == {400}
    # the same images, regenerated here, through the plain functions
    generator, manifest = load_network(store.fetch_checkpoint("ckpt-000000000064", tmp_path), "generator_ema")
    net = manifest["network"]
    feats = generator_features(generator, {"d": digits_feature_space()}, num_images=400, seed=3,
                               sigma_init=cfg.loss.sigma_init, label_dim=net["label_dim"],
                               img_shape=(net["img_channels"], net["img_resolution"], net["img_resolution"]))["d"]
    ref = read_reference(str(reference))
    ref_feats = read_reference_features(str(reference)).astype(np.float32)
    assert rows["fd_digits"]["value"] == pytest.approx(GaussianReference.from_stats(ref.mu, ref.sigma).fd(
        *stats_from_features(feats)), rel=1e-9)
    assert rows["kid_digits"]["value"] == pytest.approx(kernel_inception_distance(feats, ref_feats, seed=3), rel=1e-9)
    precision, recall = precision_recall(feats, ref_feats, k=3)
    assert (rows["precision_digits"]["value"], rows["recall_digits"]["value"]) == (precision, recall)
    assert 0 <= precision <= 1 and 0 <= recall <= 1 and rows["kid_digits"]["value"] > 0
    assert all(r["extractor_id"].startswith("digits-cnn/") and r["reference"] == str(reference) for r in rows.values())


def test_leaderboard_ranks_each_metric_its_own_way(scored, capsys):
    """Distances lowest first, precision / recall highest first (a second, worse checkpoint beside the first)."""
    store, _, _ = scored
    rows = [r for r in store.read_rows() if r["checkpoint"] == "ckpt-000000000064"]
    from schemas.leaderboard import LeaderboardRow

    for r in rows:  # a worse copy: larger distances, smaller precision / recall
        worse = r["value"] * 0.5 if r["metric"] in HIGHER_IS_BETTER else r["value"] * 2 + 1
        store.write_row(LeaderboardRow(**{**r, "checkpoint": "ckpt-000000000128", "cur_nimg": 128, "kimg": 0.128,
                                          "value": worse}))
    assert main(["leaderboard", store.uri, "--by", "run", "--json"]) == 0
    best = {r["metric"]: r["checkpoint"] for r in json.loads(capsys.readouterr().out)}
    assert best == {m: "ckpt-000000000064" for m in DIGITS_ALL}
    assert main(["leaderboard", store.uri, "--metric", "precision_digits", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert [r["checkpoint"] for r in ranked] == ["ckpt-000000000064", "ckpt-000000000128"]
    assert RunStore(store.storage).best_live_row()["metric"] == "fd_digits"  # the run's ranking metric


def test_a_reference_without_features_stops_the_run_before_training(reference, tmp_path):
    from ray_jobs.scoring import check_reference

    bare = tmp_path / "bare"
    assert main(["fid-stats", "digits", "--out", str(bare), "--quiet", "--resolution", "8"]) == 0
    cfg = load_run_config(CONFIG, ["metric.names=[fd_digits,kid_digits]", f"metric.reference={bare}"])
    with pytest.raises(ValueError, match="metric.reference: .*--features"):
        check_reference(cfg)
    with pytest.raises(ConfigError, match="metric.names"):
        load_run_config(CONFIG, ["metric.names=[fd_digits,nope]"])


def test_evaluate_reports_mean_and_std_of_every_metric(scored, capsys):
    store, _, _ = scored
    assert main(["evaluate", store.uri, "--best", "--repeats", "2", "--num-images", "100"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert set(out["metrics"]) == set(DIGITS_ALL) and all(m["repeats"] == 2 for m in out["metrics"].values())
    assert out["metrics"]["fd_digits"]["mean"] == pytest.approx(out["mean"])
    finals = [r for r in store.read_rows() if r["kind"] == "final" and r["metric"] == "kid_digits"]
    assert out["metrics"]["kid_digits"]["mean"] == pytest.approx(np.mean([r["value"] for r in finals]))
    assert "precision_digits:" in cap.err and "±" in cap.err


def test_fd_dinov2_beside_fd_digits_end_to_end_with_a_tiny_vit(reference, tmp_path):
    """FD-DINOv2 through the whole path (fid-stats --metric fd_dinov2 --dinov2, metric.references, the scorer) with
    a tiny random ViT in the official key layout (tests/test_dinov2.py): its row equals FD of the same images'
    features in that space, and the FD-digits row beside it equals a one-metric score of the same checkpoint."""
    import torch

    from sida_core.metrics.dinov2 import dinov2_feature_space
    from tests.test_dinov2 import tiny_state_dict
    from tests.test_scoring import make_run

    weights = tmp_path / "tiny_dinov2.pth"
    torch.save(tiny_state_dict(), weights)
    ref_dino = tmp_path / "digits-8-dinov2"
    assert main(["fid-stats", "digits", "--out", str(ref_dino), "--metric", "fd_dinov2", "--dinov2", str(weights),
                 "--quiet", "--resolution", "8", "--max-images", "300"]) == 0
    extra = ["metric.names=[fd_digits,fd_dinov2]", f"metric.reference={reference}", f"metric.dinov2={weights}",
             f"metric.references.fd_dinov2={ref_dino}", "metric.gallery=0", "metric.num_images=64"]
    store, cfg = make_run(Storage(str(tmp_path / "runs" / "dino")), [64], extra=extra)
    row = CheckpointScorer().score(store.storage, "ckpt-000000000064", seed=1)
    rows = {r["metric"]: r for r in store.read_rows()}
    assert set(rows) == {"fd_digits", "fd_dinov2"} and row["also"]["fd_dinov2"] == rows["fd_dinov2"]["value"]
    generator, manifest = load_network(store.fetch_checkpoint("ckpt-000000000064", tmp_path), "generator_ema")
    net = manifest["network"]
    space = dinov2_feature_space(str(weights))
    feats = generator_features(generator, {"v": space}, num_images=64, seed=1, sigma_init=cfg.loss.sigma_init,
                               label_dim=net["label_dim"],
                               img_shape=(net["img_channels"], net["img_resolution"], net["img_resolution"]))["v"]
    ref = read_reference(str(ref_dino))
    assert rows["fd_dinov2"]["value"] == pytest.approx(
        GaussianReference.from_stats(ref.mu, ref.sigma).fd(*stats_from_features(feats)), rel=1e-6)
    assert rows["fd_dinov2"]["extractor_id"] == space.extractor_id and rows["fd_dinov2"]["reference"] == str(ref_dino)
    one = CheckpointScorer().score(store.storage, "ckpt-000000000064", seed=1, metric={"names": None})
    assert one["value"] == rows["fd_digits"]["value"] and one["also"] == {}
