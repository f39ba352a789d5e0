"""EDM-preconditioned denoiser D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c) (SPEC.md "Networks").

Wraps any backbone whose forward is ``F(x, noise_labels, class_labels, return_flag=...)`` and passes the
SiDA ``return_flag`` through: the discriminator logit map comes from the backbone's encoder unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from sida_core import edm
from sida_core.networks.songunet import check_return_flag


class EDMPrecond(nn.Module):
    def __init__(self, backbone: nn.Module, img_resolution: int, img_channels: int, label_dim: int = 0,
                 sigma_data: float = edm.SIGMA_DATA):
        super().__init__()
        self.model = backbone
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                return_flag: str = "decoder"):
        check_return_flag(return_flag)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
        c_skip, c_out, c_in, c_noise = edm.precond_coefficients(sigma, self.sigma_data)
        s = lambda v: edm.expand_sigma(v, x)  # noqa: E731 - broadcast (B,) against x
        out = self.model(x * s(c_in), c_noise.flatten(), class_labels, return_flag=return_flag)
        if return_flag == "encoder":
            return out
        if return_flag == "encoder_decoder":
            f_x, logits = out
        else:
            f_x, logits = out, None
        d_x = s(c_skip) * x + s(c_out) * f_x.to(x.dtype)
        return d_x if return_flag == "decoder" else (d_x, logits)
