"""A tiny, randomly initialised diffusers AutoencoderKL saved as a local folder, standing in for the SD-VAE
(sd-vae-ft-mse) offline: same class, same code path, 2 levels (images 2x the latent size) instead of 4 (8x)."""
from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_vae(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
