"""EDM2's SD-VAE latent space (SPEC.md "EDM2", Latents), without the VAE itself.

EDM2 stores each 512x512 training image once as the VAE encoder's 8-channel moments (mean and std of 4 latent
channels at 64x64: ``dataset_tool.py encode`` writes a zip of ``00000/img-mean-std-00000000.npy`` arrays plus
``dataset.json``). A real latent is drawn afresh at every use as ``mean + std * eps`` and then standardised with
EDM2's fixed per-channel constants: ``x * scale + bias`` with ``scale = 0.5 / raw_std``, ``bias = -raw_mean * scale``.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
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


def read_latent_zip(path: Path, error=ValueError) -> tuple[np.ndarray, list[str]]:
    """(moments float32 (N, 8, h, w) sorted by member name, member names) of an EDM2 latent zip; ``.npy`` members are
    read with ``allow_pickle=False`` (data only)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise error(f"{str(path)!r}: not a readable zip file ({e})") from None
    with zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".npy"))
        if not names:
            raise error(f"{str(path)!r}: no .npy latents inside the zip (expected EDM2 dataset_tool encode output)")
        arrays = []
        for n in names:
            try:
                a = np.load(io.BytesIO(zf.read(n)), allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise error(f"{path}:{n}: not a readable .npy array ({e})") from None
            if a.ndim == 4 and a.shape[0] == 1:
                a = a[0]
            if a.ndim != 3 or a.shape[0] != 2 * LATENT_CHANNELS or (arrays and a.shape != arrays[0].shape):
                want = arrays[0].shape if arrays else f"({2 * LATENT_CHANNELS}, h, w)"
                raise error(f"{path}:{n}: latent moments of shape {a.shape}, expected {want} (mean and std of "
                            f"{LATENT_CHANNELS} channels)")
            arrays.append(a.astype(np.float32))
    return np.stack(arrays), names
