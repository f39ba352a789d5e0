"""The SD-VAE decode path of latent-space runs (sida_core.vae) with a tiny randomly initialised AutoencoderKL:
shapes, value range, EDM2's scale/bias inverted exactly, one-line errors, and the config rules."""
from __future__ import annotations

import json

import pytest
import torch

from schemas.loader import ConfigError, load_run_config
from sida_core.latents import encode_moments
from sida_core.vae import LatentDecoder, VAEError, load_vae, upsampling_factor
from tests.recipes import CONFIG
from tests.tiny_vae import write_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def test_decode_shapes_range_and_scale_bias_round_trip(vae_dir):
    vae = load_vae(vae_dir)
    assert upsampling_factor(vae_dir) == 2
    pixels = torch.rand(3, 3, 16, 16)  # EDM2 feeds the VAE pixels in [0, 1]
    with torch.no_grad():
        d = vae.encode(pixels).latent_dist
    # EDM2's moments -> standardised latents (std 0: the mean exactly), then our decoder undoes scale and bias
    x = encode_moments(torch.cat([d.mean, torch.zeros_like(d.std)], dim=1))
    images = LatentDecoder(vae, batch_size=2)(x)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        want = vae.decode(d.mean).sample.clamp(0, 1) * 2 - 1
    torch.testing.assert_close(images, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(LatentDecoder(vae)(x + 0.5), images)  # the latents matter


def test_bad_vae_folders_are_one_line_errors(tmp_path, vae_dir):
    with pytest.raises(VAEError, match="no config.json"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16}))
    with pytest.raises(VAEError, match="safetensors"):
        load_vae(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(VAEError, match="16 latent channels"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(VAEError, match="cannot load the AutoencoderKL"):
        load_vae(tmp_path)


def test_config_rules(tmp_path, vae_dir):
    base = ["teacher.path=" + str(tmp_path), "data.kind=latents", f"data.path={tmp_path}", "data.channels=4",
            "data.resolution=8", "metric.name=fid_inception", f"metric.reference={tmp_path}"]
    with pytest.raises(ConfigError, match="metric.vae is required to score a latent-space run"):
        load_run_config(CONFIG, base)
    cfg = load_run_config(CONFIG, base + [f"metric.vae={vae_dir}"])
    assert cfg.metric.vae == str(vae_dir)
    with pytest.raises(ConfigError, match="metric.vae: file"):
        load_run_config(CONFIG, base + [f"metric.vae={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="metric.vae is only used by latent-space runs"):
        load_run_config(CONFIG, [f"metric.vae={vae_dir}"])


def test_gallery_tiles_of_large_decodes_are_downscaled_by_area():
    """EDM2 galleries decode to 512 px: tiles are area-downscaled to GALLERY_TILE px (the mean of each block, aspect
    kept); small images (digits, CIFAR-10) pass through untouched."""
    import io

    from PIL import Image

    from sida_core.sampling import GALLERY_TILE, fit_tiles, grid_png

    big = torch.rand(4, 3, 512, 256) * 2 - 1
    small = fit_tiles(big, GALLERY_TILE)
    assert small.shape == (4, 3, 128, 64)
    assert torch.allclose(small[0, 0, 0, 0], big[0, 0, :4, :4].mean(), atol=1e-6)  # a 4x4 block's mean
    cifar = torch.rand(2, 3, 32, 32)
    assert fit_tiles(cifar, GALLERY_TILE) is cifar
    png = Image.open(io.BytesIO(grid_png(small)))
    assert png.size == (2 * 65 + 1, 2 * 129 + 1)  # 2 x 2 tiles of 64 x 128 + 1 px padding
