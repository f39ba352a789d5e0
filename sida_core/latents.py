"""EDM2's SD-VAE latent space (SPEC.md "EDM2", Latents), without the VAE itself.

EDM2 stores each 512x512 training image once as the VAE encoder's 8-channel moments (mean and std of 4 latent
channels at 64x64: ``dataset_tool.py encode`` writes a zip of ``00000/img-mean-std-00000000.npy`` arrays plus
``dataset.json``). A real latent is drawn afresh at every use as ``mean + std * eps`` and then standardised with
EDM2's fixed per-channel constants: ``x * scale + bias`` with ``scale = 0.5 / raw_std``, ``bias = -raw_mean * scale``.
"""
from __future__ import annotations

from typing import Optional

import torch

RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # EDM2's StabilityVAEEncoder defaults (sd-vae-ft-mse on ImageNet 512)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
LATENT_CHANNELS = 4


def scale_bias(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    std, mean = torch.tensor(RAW_STD, device=device), torch.tensor(RAW_MEAN, device=device)
    scale = 0.5 / std
    return scale.reshape(1, -1, 1, 1), (-mean * scale).reshape(1, -1, 1, 1)


def encode_moments(moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standardised latents (B, 4, h, w) from VAE moments (B, 8, h, w) = [mean, std]: a fresh draw per call."""
    mean, std = moments.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, device=mean.device, generator=generator)
    scale, bias = scale_bias(mean.device)
    return (mean + std * eps) * scale + bias
