"""Network factory: one place that turns an architecture name + keyword arguments into a denoiser."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from sida_core.networks.adm import DhariwalUNet
from sida_core.networks.edm2 import EDM2Precond
from sida_core.networks.mlp import MLPNet
from sida_core.networks.precond import PRECONDITIONERS, EDMPrecond, VEPrecond, VPPrecond
from sida_core.networks.songunet import RETURN_FLAGS, SongUNet

# Backbones: constructor(img_resolution, in_channels, out_channels, label_dim, **kwargs), forward(x, noise_labels,
# class_labels, augment_labels=None, return_flag=...). New families (e.g. EDM2) register here.
ARCHITECTURES = {"songunet": SongUNet, "adm": DhariwalUNet, "mlp": MLPNet}  # plus "edm2" (EDM2Precond, below)

__all__ = ["ARCHITECTURES", "DhariwalUNet", "EDM2Precond", "EDMPrecond", "MLPNet", "PRECONDITIONERS", "RETURN_FLAGS", "SongUNet",
           "VEPrecond", "VPPrecond", "build_denoiser", "count_parameters"]


def build_denoiser(arch: str, img_resolution: int, img_channels: int, label_dim: int = 0,
                   kwargs: Mapping[str, Any] | None = None, precond: str = "edm",
                   precond_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a preconditioned denoiser.

    ``kwargs`` go to the backbone (e.g. SongUNet's model_channels); ``precond`` is ``"edm"`` (default), ``"vp"`` or
    ``"ve"`` (EDM's baseline preconditionings) and ``precond_kwargs`` go to it (e.g. VP's beta_d, VE's sigma_max).
    ``arch="edm2"``: EDM2's Precond is its own preconditioner; ``kwargs`` go to :class:`EDM2Precond` (UNet / Block
    kwargs, ``sigma_data``, ``logvar_channels``) and ``precond`` must be left at its default.
    """
    if arch == "edm2":
        if precond not in ("edm", "edm2") or precond_kwargs:
            raise ValueError(f"network.precond {precond!r} does not apply to arch 'edm2' (it brings its own)")
        return EDM2Precond(img_resolution, img_channels, label_dim, **dict(kwargs or {}))
    if arch not in ARCHITECTURES:
        raise ValueError(f"network.arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if precond not in PRECONDITIONERS:
        raise ValueError(f"network.precond must be one of {sorted(PRECONDITIONERS)}, got {precond!r}")
    backbone = ARCHITECTURES[arch](img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                                   label_dim=label_dim, **dict(kwargs or {}))
    return PRECONDITIONERS[precond](backbone, img_resolution=img_resolution, img_channels=img_channels,
                                    label_dim=label_dim, **dict(precond_kwargs or {}))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
