"""sida_core.metrics: Fréchet distance, the cached digit classifier, FD-digits through clean-fid's code path."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sida_core.data import load_dataset
from sida_core.metrics import (digits_feature_space, extract_features, fd_digits, fd_from_features, frechet_distance,
                               frechet_distance_from_tensors, load_digits_classifier, load_stats, save_stats,
                               stats_from_features)
from sida_core.metrics import digits_classifier as dc

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One classifier for the module, trained into a private cache (about 10 s on 1 CPU thread)."""
    d = tmp_path_factory.mktemp("sida_cache")
    load_digits_classifier(d)
    return d


@pytest.fixture(scope="module")
def space(cache):
    return digits_feature_space(cache)


@pytest.fixture(scope="module")
def split():
    cfg = SimpleNamespace(kind="digits", path=None, resolution=8, channels=1, cond=False, num_classes=0,
                          holdout_fraction=0.2, split_seed=0)
    return load_dataset(cfg)


# ------------------------------------------------------------------------------------------- Fréchet math

def test_frechet_closed_forms_and_clean_fid_agreement():
    assert frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(1 + 1 + 4 - 2 * 2)
    s1, s2 = np.diag([1.0, 9.0]), np.diag([4.0, 1.0])
    assert frechet_distance(np.zeros(2), s1, np.ones(2), s2) == pytest.approx(2 + (1 - 2) ** 2 + (3 - 1) ** 2)
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(200, 16))
    from cleanfid import fid as cfid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid passes sqrtm's deprecated disp=
        ref = cfid.fid_from_feats(f1, f2)
    assert fd_from_features(f1, f2) == pytest.approx(ref, rel=1e-9)
    mu, sig = stats_from_features(f1)
    assert frechet_distance(mu, sig, mu, sig) == pytest.approx(0.0, abs=1e-8)


def test_frechet_rank_deficient_is_finite_and_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    low = rng.normal(size=(10, 3)) @ rng.normal(size=(3, 32))  # rank-3 covariance in 32-d
    fd = fd_from_features(low, low + 0.1)
    assert np.isfinite(fd) and fd == pytest.approx(32 * 0.01, rel=1e-3)
    save_stats(tmp_path / "s.npz", *stats_from_features(low))
    mu, sig = load_stats(tmp_path / "s.npz")
    assert np.allclose(mu, low.mean(0)) and sig.shape == (32, 32)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# -------------------------------------------------------------------------------------------- classifier

def test_classifier_accuracy_and_cache_reuse(cache, monkeypatch):
    net = load_digits_classifier(cache)
    assert net.holdout_accuracy >= 0.97
    files = list((cache / "digits_classifier").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith(dc.cache_key()[:20])
    mtime, trained = files[0].stat().st_mtime_ns, dc.TRAIN_COUNT
    dc._MEMO.clear()  # force a reload from disk
    monkeypatch.setenv("SIDA_CACHE", str(cache))
    again = load_digits_classifier()  # via $SIDA_CACHE
    assert dc.TRAIN_COUNT == trained and files[0].stat().st_mtime_ns == mtime
    assert again is not net and again.holdout_accuracy == net.holdout_accuracy
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_extractor_accepts_rgb_and_other_sizes(space, split):
    x = (split[1].images[:20] + 1) * 127.5
    f1 = space.extractor(x)
    assert f1.shape == (20, dc.FEATURE_DIM)
    assert torch.allclose(space.extractor(x.repeat(1, 3, 1, 1)), f1, atol=1e-4)
    up = torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")
    assert torch.allclose(space.extractor(up), f1, atol=1e-4)


# ----------------------------------------------------------------------------------------------- FD-digits

def test_fd_digits_floor_and_separation(space, split, cache):
    train, hold = split
    ref = space.stats(train.images)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(hold.images.shape, generator=g) * 2 - 1
    flat = hold.images.flatten(1)
    shuffled = flat[:, torch.randperm(flat.shape[1], generator=g)].view_as(hold.images)
    self_fd, floor = space.fd(ref, ref), space.fd(ref, hold.images)
    fd_noise, fd_shuf = space.fd(ref, noise), space.fd(ref, shuffled)
    assert self_fd < 1e-6
    assert 0 < floor < 5
    assert fd_noise > 30 * floor and fd_shuf > 30 * floor
    assert fd_digits(train.images, hold.images, cache_dir=cache) == pytest.approx(floor, rel=1e-6)


def test_fd_digits_at_16px_matches_native(space, split):
    hold = split[1].images
    up = torch.nn.functional.interpolate(hold, scale_factor=2, mode="nearest").repeat(1, 3, 1, 1)
    assert np.allclose(space.features(up), space.features(hold), atol=1e-4)


def test_scoring_goes_through_clean_fid(space, split, monkeypatch, tmp_path):
    """Tensor path == clean-fid's own folder path (compute_fid with our extractor), and calls its function."""
    from cleanfid import fid as cfid

    calls = []
    real = cfid.get_model_features
    monkeypatch.setattr(cfid, "get_model_features", lambda *a, **k: calls.append(k) or real(*a, **k))
    # quantise so PNGs hold exactly the tensor's values
    a = (((split[0].images[:150] + 1) * 127.5).round() / 127.5 - 1)
    b = (((split[1].images[:120] + 1) * 127.5).round() / 127.5 - 1)
    rng_before = torch.get_rng_state()
    fd_tensors = space.fd(a, b)
    assert len(calls) == 2 and calls[0]["custom_fn_resize"] is space.fn_resize
    assert torch.equal(torch.get_rng_state(), rng_before)  # clean-fid's latent draws do not leak
    for name, imgs in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(((imgs[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()):
            Image.fromarray(img).save(tmp_path / name / f"{i:05d}.png")
    feats = cfid.get_folder_features(str(tmp_path / "a"), space.extractor, num_workers=0, device=torch.device("cpu"),
                                     mode="clean", custom_fn_resize=space.fn_resize, verbose=False)
    assert np.allclose(feats, space.features(a), atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fd_folders = cfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), **space.clean_fid_kwargs())
    assert fd_folders == pytest.approx(fd_tensors, rel=1e-4)


def test_generic_tensor_path_with_custom_extractor():
    """frechet_distance_from_tensors with a toy extractor equals the direct computation."""
    def mean_colour(batch):  # (N, 3, H, W) in [0, 255] -> (N, 3)
        return batch.mean(dim=(2, 3))

    identity = lambda img: img.astype(np.float32)  # noqa: E731  (keep native size)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, 3, 5, 5, generator=g) * 2 - 1, torch.rand(33, 3, 5, 5, generator=g) * 1.5 - 0.5
    fd = frechet_distance_from_tensors(a, b, mean_colour, fn_resize=identity, batch_size=16)
    direct = fd_from_features(((a + 1) * 127.5).mean(dim=(2, 3)).numpy(), ((b + 1) * 127.5).mean(dim=(2, 3)).numpy())
    assert fd == pytest.approx(direct, rel=1e-5)
    assert extract_features(a, mean_colour, fn_resize=identity, batch_size=7).shape == (40, 3)


def test_unreadable_cache_file_is_ignored(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match=r"x\.pt.*retraining"):
        assert dc._read_checkpoint(bad) is None


def test_fd_from_features_low_rank_route_matches_sqrtm():
    """N < D: fd_from_features takes the exact cross-Gram route; it equals the D x D sqrtm route."""
    rng = np.random.default_rng(2)
    for n1, n2, d in ((30, 20, 100), (5, 40, 64), (48, 48, 300)):
        mix = rng.normal(size=(d, d)) * 0.3
        f1, f2 = rng.normal(size=(n1, d)) @ mix, rng.normal(0.2, 1.1, size=(n2, d)) @ mix
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy: "Matrix is singular"
            ref = frechet_distance(*stats_from_features(f1), *stats_from_features(f2))
        assert fd_from_features(f1, f2) == pytest.approx(ref, rel=1e-6)
        assert fd_from_features(f1, f1) <= 1e-9 * np.trace(stats_from_features(f1)[1])


@pytest.mark.parametrize("n", [40, 600])  # rank-deficient (N < D) and full-rank covariances
def test_gaussian_reference_matches_sqrtm_route(n):
    from sida_core.metrics.frechet import GaussianReference, stats_from_features

    rng = np.random.default_rng(n)
    d = 256
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    ref = stats_from_features(rng.normal(size=(n, d)) @ mix)
    prepared = GaussianReference.from_stats(*ref)
    for shift in (0.0, 0.3):
        gen = stats_from_features(rng.normal(size=(n, d)) @ (mix + shift * np.eye(d)) + shift)
        expected = frechet_distance(*gen, *ref)
        assert prepared.fd(*gen) == pytest.approx(expected, rel=1e-6), (n, shift)
    assert prepared.fd(*ref) == pytest.approx(0.0, abs=1e-6 * np.trace(ref[1]))
    with pytest.raises(ValueError, match="mismatched statistics"):
        prepared.fd(ref[0][:10], ref[1][:10, :10])
