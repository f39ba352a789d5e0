"""Network factory: one place that turns an architecture name + keyword arguments into a denoiser."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from sida_core.networks.edm2 import EDM2Precond
from sida_core.networks.mlp import MLPNet
from sida_core.networks.precond import EDMPrecond
from sida_core.networks.songunet import RETURN_FLAGS, SongUNet

ARCHITECTURES = {"songunet": SongUNet, "mlp": MLPNet}

__all__ = ["ARCHITECTURES", "EDM2Precond", "EDMPrecond", "MLPNet", "RETURN_FLAGS", "SongUNet", "build_denoiser", "count_parameters"]


def build_denoiser(arch: str, img_resolution: int, img_channels: int, label_dim: int = 0,
                   kwargs: Mapping[str, Any] | None = None) -> EDMPrecond:
    """Build an EDM-preconditioned denoiser; ``kwargs`` go to the backbone (e.g. SongUNet's model_channels)."""
    if arch == "edm2":  # EDM2's Precond is its own preconditioner: kwargs go to EDM2Precond (UNet/Block kwargs)
        return EDM2Precond(img_resolution, img_channels, label_dim, **dict(kwargs or {}))
    if arch not in ARCHITECTURES:
        raise ValueError(f"network.arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    backbone = ARCHITECTURES[arch](img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                                   label_dim=label_dim, **dict(kwargs or {}))
    return EDMPrecond(backbone, img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
