"""The SD-VAE decoder that turns EDM2 latents into images for scoring (SPEC "EDM2"; EDM2's StabilityVAEEncoder).

EDM2's convention, which its latent zips and networks use: the VAE sees pixels in [0, 1] (not [-1, 1]); the raw
latents are the VAE's own (no 0.18215 factor); the networks' latents are standardised with the fixed per-channel
``scale`` and ``bias`` of :mod:`sida_core.latents`. Decoding inverts that: ``raw = (x - bias) / scale``, then the
VAE decoder, then ``clamp(0, 1)``; images are returned in [-1, 1] like every other image in this project.

The weights come from a local diffusers ``AutoencoderKL`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, e.g. ``stabilityai/sd-vae-ft-mse`` saved once on a machine with
internet): loaded with ``local_files_only`` and safetensors only, so nothing is downloaded and no pickle is read.
``diffusers`` is imported only here, only when a latent run is scored.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from sida_core.latents import scale_bias

WEIGHTS = "diffusion_pytorch_model.safetensors"


class VAEError(ValueError):
    """The VAE folder is missing, incomplete or not an AutoencoderKL: the message names it."""


def vae_config(folder: Path) -> dict:
    """The folder's diffusers config (checked to be an AutoencoderKL with 4 latent channels and safetensors weights)."""
    folder = Path(folder).expanduser()
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise VAEError(f"metric.vae {str(folder)!r}: no config.json; expected a diffusers AutoencoderKL folder "
                       f"(config.json + {WEIGHTS}, e.g. stabilityai/sd-vae-ft-mse saved with save_pretrained)")
    if not (folder / WEIGHTS).is_file():
        raise VAEError(f"metric.vae {str(folder)!r}: no {WEIGHTS} (only safetensors weights are read)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise VAEError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("_class_name") not in (None, "AutoencoderKL") or int(cfg.get("latent_channels", 4)) != 4:
        raise VAEError(f"{cfg_path}: {cfg.get('_class_name')} with {cfg.get('latent_channels')} latent channels; "
                       "expected an AutoencoderKL with 4 (the SD-VAE of EDM2's latents)")
    return cfg


def upsampling_factor(folder: Path) -> int:
    """Image pixels per latent pixel (8 for the SD-VAE: 2 ** (number of blocks - 1))."""
    return 2 ** (len(vae_config(folder).get("block_out_channels", [0, 0, 0, 0])) - 1)


def load_vae(folder: Path, device="cpu"):
    """The AutoencoderKL of ``folder`` (eval, frozen, float32) on ``device``; see the module docstring."""
    vae_config(folder)
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # a dependency of the project; a broken install should still say what is missing
        raise VAEError(f"scoring latents needs the diffusers package ({e})") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(Path(folder).expanduser()), local_files_only=True,
                                            use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise VAEError(f"metric.vae {str(folder)!r}: cannot load the AutoencoderKL ({str(e).splitlines()[0]})") from None
    return vae.eval().requires_grad_(False).float().to(device)


class LatentDecoder:
    """Callable: standardised latents (B, 4, h, w) -> images (B, 3, f h, f w) in [-1, 1], ``batch_size`` at a time."""

    def __init__(self, vae, batch_size: int = 8, device: Optional[torch.device] = None):
        self.vae, self.batch_size = vae, int(batch_size)
        self.device = device or next(vae.parameters()).device

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        scale, bias = scale_bias(self.device)
        out = []
        for x in latents.split(self.batch_size):
            raw = (x.to(self.device, torch.float32) - bias) / scale
            pixels = self.vae.decode(raw).sample  # [0, 1] in EDM2's convention
            out.append(pixels.clamp(0, 1).mul(2).sub(1).float().cpu())
        return torch.cat(out)
