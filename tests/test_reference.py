"""Reference statistics: manifest, npz round trip, compatibility checks, bare (EDM-format) .npz files, and
``sida fid-stats digits`` to a local folder and to a real loopback S3 server (moto). FD-digits only: fast."""
from __future__ import annotations

import dataclasses
import io
import json
import warnings

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.fid_stats import load_reference_images
from store.reference import ReferenceStatsError, read_reference, write_reference
from sida_core.metrics import digits_feature_space
from sida_core.metrics.reference import ReferenceMismatch, ReferenceStats, check_compatible, compute_reference


@pytest.fixture(scope="module")
def space():
    return digits_feature_space()


@pytest.fixture(scope="module")
def train_images():
    return load_reference_images("digits")[0]


def edm_npz(mu, sigma) -> bytes:
    """EDM's fid.py layout: ``np.savez(dest, mu=mu, sigma=sigma)``, nothing else."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma)
    return buf.getvalue()


def test_compute_reference_manifest_and_npz_round_trip(space, train_images):
    ref = compute_reference(train_images, space, dataset_desc={"name": "digits"})
    m = ref.manifest
    assert (m["metric"], m["extractor_id"], m["mode"], m["feature_dim"]) == ("fd_digits", space.extractor_id, "clean", 64)
    assert (m["num_images"], m["resolution"], m["channels"]) == (1438, 8, 1)
    assert len(m["dataset_sha256"]) == 64 and m["dataset"] == {"name": "digits"} and m["clean_fid_version"] == "0.1.35"
    mu, sigma = space.stats(train_images)
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma)
    back = ReferenceStats.from_npz_bytes(ref.to_npz_bytes(), json.loads(json.dumps(m)))
    assert np.array_equal(back.mu, ref.mu) and np.array_equal(back.sigma, ref.sigma) and back.manifest == m
    assert space.fd(back.stats, ref.stats) < 1e-9
    check_compatible(m, space, 8)


def test_mismatched_manifest_is_refused_naming_the_field(space, train_images):
    m = compute_reference(train_images[:50], space, dataset_desc={}).manifest
    cases = [(dict(extractor_id="inception-v3-fid/sha256:7ff4"), r"extractor 'inception-v3-fid/sha256:7ff4' does not match .*digits-cnn/"),  # noqa: E501
             (dict(mode="legacy_tensorflow"), r"mode 'legacy_tensorflow' does not match the scorer's 'clean'"),
             (dict(feature_dim=2048), r"feature dim 2048 does not match fd_digits's 64")]
    for change, pattern in cases:
        with pytest.raises(ReferenceMismatch, match=pattern) as err:
            check_compatible({**m, **change}, space, 8)
        assert "\n" not in str(err.value)
    with pytest.raises(ReferenceMismatch, match=r"resolution 8 does not match the scored images' 16"):
        check_compatible(m, space, 16)
    assert issubclass(ReferenceMismatch, ValueError)


def test_bare_edm_npz_accepted_with_one_warning_and_dim_checked(space, train_images, tmp_path):
    mu, sigma = space.stats(train_images)
    (tmp_path / "edm-ref.npz").write_bytes(edm_npz(mu, sigma))
    ref = read_reference(str(tmp_path / "edm-ref.npz"))
    assert ref.manifest["extractor_id"] is None and ref.manifest["feature_dim"] == 64
    with pytest.warns(UserWarning, match="bare mu/sigma without a manifest.*unknown"):
        check_compatible(ref.manifest, space, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time: the second check is silent
        check_compatible(ref.manifest, space, 16)  # resolution unknown: not checked
    assert space.fd(ref.stats, (mu, sigma)) < 1e-9
    (tmp_path / "big.npz").write_bytes(edm_npz(np.zeros(2048), np.eye(2048)))
    with pytest.raises(ReferenceMismatch, match=r"big\.npz: feature dim 2048 does not match fd_digits's 64"):
        check_compatible(read_reference(str(tmp_path / "big.npz")).manifest, space, 8)
    (tmp_path / "bad.npz").write_bytes(edm_npz(np.zeros(3), np.eye(4)))
    with pytest.raises(ReferenceStatsError, match=r"bad\.npz.*expected mu \(D,\) and sigma \(D, D\)"):
        read_reference(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "nokeys.npz", images=np.zeros(3))
    with pytest.raises(ReferenceStatsError, match=r"keys 'mu' and 'sigma', found \['images'\]"):
        read_reference(str(tmp_path / "nokeys.npz"))


def test_fid_stats_digits_round_trip_local(space, train_images, tmp_path, capsys):
    out = tmp_path / "refs" / "digits"
    assert main(["fid-stats", "digits", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["out"] == str(out) and summary["num_images"] == 1438 and summary["extractor_id"] == space.extractor_id
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "stats.npz"]
    ref = read_reference(str(out))
    mu, sigma = space.stats(train_images)
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma)
    assert ref.manifest["source"] == str(out) and ref.manifest["dataset"]["split"].startswith("train")
    check_compatible(ref.manifest, space, 8)
    assert np.array_equal(read_reference(str(out / "stats.npz")).mu, mu)  # URI/stats.npz uses its manifest
    # stats.npz replaced under an old manifest: refused (the manifest records its sha256)
    (out / "stats.npz").write_bytes(edm_npz(mu + 1, sigma))
    with pytest.raises(ReferenceStatsError, match=r"stats\.npz.*sha256 .* does not match the manifest's"):
        read_reference(str(out))
    with pytest.raises(ReferenceStatsError, match=r"no manifest\.json"):
        read_reference(str(tmp_path))


def test_fid_stats_digits_round_trip_s3(space, train_images, s3_bucket, capsys):
    uri = f"{s3_bucket.uri}/refs/digits"
    assert main(["fid-stats", "digits", "--out", uri, "--endpoint-url", s3_bucket.endpoint_url, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["out"] == uri
    keys = sorted(o["Key"] for o in s3_bucket.server.client().list_objects_v2(Bucket=s3_bucket.name)["Contents"])
    assert keys == ["refs/digits/manifest.json", "refs/digits/stats.npz"]
    ref = read_reference(uri, endpoint_url=s3_bucket.endpoint_url)
    mu, sigma = space.stats(train_images)
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma) and ref.manifest["source"] == uri
    # a bare EDM .npz as an S3 object
    s3_bucket.server.client().put_object(Bucket=s3_bucket.name, Key="edm/cifar10-32x32.npz", Body=edm_npz(mu, sigma))
    bare = read_reference(f"{s3_bucket.uri}/edm/cifar10-32x32.npz", endpoint_url=s3_bucket.endpoint_url)
    assert bare.manifest["extractor_id"] is None and np.array_equal(bare.sigma, sigma)
    # rewriting the folder replaces both files (old manifest removed first)
    smaller = compute_reference(train_images[:100], space, dataset_desc={"name": "digits[:100]"})
    write_reference(smaller, uri, endpoint_url=s3_bucket.endpoint_url)
    assert read_reference(uri, endpoint_url=s3_bucket.endpoint_url).manifest["num_images"] == 100


def test_fid_stats_user_data_and_errors(space, tmp_path, capsys):
    imgs = (np.random.default_rng(0).random((20, 16, 16)) * 255).astype(np.uint8)
    np.savez(tmp_path / "data.npz", images=imgs)
    out = tmp_path / "ref"
    assert main(["fid-stats", str(tmp_path / "data.npz"), "--out", str(out), "--metric", "fd_digits",
                 "--resolution", "16", "--channels", "1", "--max-images", "12", "--quiet"]) == 0
    m = read_reference(str(out)).manifest
    assert (m["num_images"], m["resolution"], m["channels"], m["dataset"]["kind"]) == (12, 16, 1, "npz")
    assert m["dataset"]["total_images"] == 20 and m["dataset"]["split"] == "all"
    capsys.readouterr()
    bad = [(["fid-stats", str(tmp_path / "data.npz"), "--out", str(out)], "--resolution is required"),
           (["fid-stats", str(tmp_path / "nope"), "--out", str(out)], "no such file or folder"),
           (["fid-stats", "digits", "--out", str(out), "--kind", "zip"], "needs a path"),
           (["fid-stats", "digits", "--out", str(out), "--resolution", "12"], "multiple of 8"),
           (["fid-stats", "digits", "--out", "ftp://x/y"], "unsupported scheme")]
    for argv, needle in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (argv, err)
    with pytest.raises(ReferenceStatsError, match="at least|>= 2"):
        load_reference_images("digits", max_images=1)


def test_reference_stats_validate_shapes():
    with pytest.raises(ValueError, match=r"mu \(D,\) and sigma \(D, D\)"):
        ReferenceStats(np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        ReferenceStats(np.array([np.nan]), np.eye(1))
    r = ReferenceStats(np.zeros(3, np.float32), np.eye(3))
    assert r.mu.dtype == np.float64 and r.feature_dim == 3 and dataclasses.is_dataclass(r)


def test_checkpoint_scorer_reads_fid_stats_output(space, train_images, tmp_path):
    """The scorer actors' reference lookup (ray_jobs.scoring, no Ray started) takes a `sida fid-stats` folder."""
    from ray_jobs.scoring import CheckpointScorer
    from schemas.loader import load_run_config

    out = tmp_path / "ref"
    write_reference(compute_reference(train_images, space, dataset_desc={"name": "digits"}), str(out))
    cfg = load_run_config("configs/digits.yaml", [f"metric.reference={out}"])
    ref, _, desc = CheckpointScorer().reference(cfg, cfg.metric, space)
    ref_mu, ref_sigma = space.stats(train_images)
    assert np.array_equal(ref.mu, ref_mu) and np.array_equal(ref.sigma, ref_sigma) and desc == str(out)
    cfg16 = load_run_config("configs/digits.yaml", [f"metric.reference={out}", "data.resolution=16"])
    with pytest.raises(ReferenceMismatch, match="resolution 8 does not match the scored images' 16"):
        CheckpointScorer().reference(cfg16, cfg16.metric, space)


def test_sida_train_refuses_mismatched_reference_before_anything_starts(space, train_images, tmp_path, capsys):
    out, runs = tmp_path / "ref", tmp_path / "runs"
    write_reference(compute_reference(train_images, space, dataset_desc={"name": "digits"}), str(out))
    code = main(["train", "configs/digits.yaml", "--name", "r", "--set", f"metric.reference={out}",
                 "--set", "data.resolution=16", "--set", f"storage.uri={runs}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "resolution 8 does not match" in err, err
    assert not (runs / "r").exists()  # refused before the run folder, the teacher copy or Ray


# ------------------------------------------------------------------------ published statistics, imported
def _inception_stats(seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((64, 2048)) * 0.1
    return rng.standard_normal(2048), a.T @ a + np.eye(2048)  # symmetric positive definite


def _inception_space(mode: str):
    """The fid_inception space's identity (no weights needed: check_compatible reads only its ids)."""
    from sida_core.metrics import FeatureSpace
    from sida_core.metrics.inception import FEATURE_DIM, SHA256

    return FeatureSpace("fid_inception", extractor=None, extractor_id=f"inception-v3-fid/sha256:{SHA256}", mode=mode,
                        feature_dim=FEATURE_DIM)


@pytest.mark.parametrize("fmt", ["edm-npz", "clean-fid-npz", "edm2-pkl"])
def test_reference_import_states_the_protocol_the_file_implies(fmt, tmp_path, capsys):
    """EDM's .npz and EDM2's .pkl imply legacy_tensorflow, a clean-fid file names its mode; the imported folder
    scores in that protocol only (the other is refused in one line naming both) with the file's exact mu/sigma."""
    import pickle

    mu, sigma = _inception_stats()
    if fmt == "edm2-pkl":
        src = tmp_path / "img512.pkl"  # EDM2's layout: {fid: {mu, sigma}, fd_dinov2: {mu, sigma}}
        src.write_bytes(pickle.dumps({"fid": {"mu": mu, "sigma": sigma},
                                      "fd_dinov2": {"mu": np.zeros(1024), "sigma": np.eye(1024)}}))
    else:
        src = tmp_path / ("cifar10-32x32.npz" if fmt == "edm-npz" else "cifar10_clean_train_32.npz")
        src.write_bytes(edm_npz(mu, sigma))
    want = "clean" if fmt == "clean-fid-npz" else "legacy_tensorflow"
    out = tmp_path / "ref"
    assert main(["reference", "import", str(src), "--out", str(out), "--resolution", "32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["format"] == fmt and summary["mode"] == want
    ref = read_reference(str(out))
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma)
    m = ref.manifest
    assert (m["mode"], m["resolution"], m["feature_dim"], m["metric"]) == (want, 32, 2048, "fid_inception")
    assert m["dataset"]["format"] == fmt and len(m["dataset"]["sha256"]) == 64
    check_compatible(m, _inception_space(want), 32)
    other = "clean" if want == "legacy_tensorflow" else "legacy_tensorflow"
    with pytest.raises(ReferenceMismatch, match=f"mode '{want}' does not match the scorer's '{other}'"):
        check_compatible(m, _inception_space(other), 32)
    with pytest.raises(ReferenceMismatch, match="resolution 32"):
        check_compatible(m, _inception_space(want), 64)


def test_reference_import_refuses_in_one_line_and_writes_nothing(tmp_path, capsys):
    import pickle

    mu, sigma = _inception_stats()
    hostile = tmp_path / "evil.pkl"
    import os

    hostile.write_bytes(pickle.dumps({"fid": {"mu": mu, "sigma": sigma}, "x": os.system}))  # a global that is not data
    dinov2 = tmp_path / "img512.pkl"
    dinov2.write_bytes(pickle.dumps({"fd_dinov2": {"mu": np.zeros(1024), "sigma": np.eye(1024)}}))
    legacy_pt = tmp_path / "cifar10_legacy_pytorch_train_32.npz"
    legacy_pt.write_bytes(edm_npz(mu, sigma))
    small = tmp_path / "small.npz"
    small.write_bytes(edm_npz(np.zeros(16), np.eye(16)))
    import torch

    from tests.test_dinov2 import tiny_state_dict

    weights = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict(), weights)  # a 128-wide ViT: EDM2's 1024-d statistics do not fit it
    cases = [(hostile, [], ".system, which"), (dinov2, [], "'fid'"), (dinov2, ["--key", "fd_dinov2"], "needs --dinov2"),
             (dinov2, ["--key", "fd_dinov2", "--dinov2", str(weights)], "fd_dinov2 statistics have 128 features"),
             (small, ["--key", "fd_dinov2", "--dinov2", str(weights)], "not a .npz"),
             (legacy_pt, [], "'legacy_pytorch'"), (small, [], "2048 features"), (tmp_path / "nope.npz", [], "no such file"),
             (tmp_path / "stats.txt", [], "expected EDM's")]
    (tmp_path / "stats.txt").write_text("mu sigma")
    for src, extra, needle in cases:
        out = tmp_path / "out"
        assert main(["reference", "import", str(src), "--out", str(out), "--resolution", "32", *extra]) == 2, src
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (src, err)
        assert not out.exists()


def test_reference_import_of_edm2_fd_dinov2_statistics_names_the_weights(tmp_path, capsys):
    """EDM2's {fd_dinov2: {mu, sigma}} with --dinov2: the manifest's extractor is that weights file (a tiny ViT in
    the official layout here), so the fd_dinov2 space of those weights accepts it and other weights are refused."""
    import pickle

    import torch

    from sida_core.metrics.dinov2 import dinov2_feature_space
    from tests.test_dinov2 import tiny_state_dict

    weights, other = tmp_path / "tiny.pth", tmp_path / "other.pth"
    torch.save(tiny_state_dict(0), weights)
    torch.save(tiny_state_dict(1), other)
    d = dinov2_feature_space(str(weights)).feature_dim
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d))
    mu, sigma = rng.normal(size=d), a @ a.T / d
    src = tmp_path / "img64.pkl"
    src.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(2048), "sigma": np.eye(2048)}, "fd_dinov2": {"mu": mu, "sigma": sigma}}))
    out = tmp_path / "ref"
    assert main(["reference", "import", str(src), "--out", str(out), "--resolution", "64", "--key", "fd_dinov2",
                 "--dinov2", str(weights)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["metric"], summary["mode"], summary["feature_dim"]) == ("fd_dinov2", "clean", d)
    ref = read_reference(str(out))
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma)
    check_compatible(ref.manifest, dinov2_feature_space(str(weights)), 64)
    with pytest.raises(ReferenceMismatch, match="extractor"):
        check_compatible(ref.manifest, dinov2_feature_space(str(other)), 64)
