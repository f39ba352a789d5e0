"""Preconditioned denoisers D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c) (SPEC.md "Networks").

``EDMPrecond`` is the project's default; ``VPPrecond`` and ``VEPrecond`` are EDM's baseline preconditionings (needed
for EDM's ``baseline-*`` teachers), with EDM's constructor names for the schedule constants and EDM's formulas.
All wrap any backbone whose forward is ``F(x, noise_labels, class_labels, return_flag=...)``, kept at ``self.model``
(EDM's attribute name, so EDM state dicts load with strict=True), and share one forward that passes the SiDA
``return_flag`` through: the discriminator logit map comes from the backbone's encoder unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from sida_core import edm
from sida_core.networks.songunet import check_return_flag


def precond_inputs(x: torch.Tensor, sigma, class_labels: torch.Tensor | None, label_dim: int):
    """The calling convention every preconditioned denoiser shares: sigma as a (B,) float32 tensor (a scalar is
    broadcast), no labels for an unconditional net, zero labels when a conditional one gets none."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    if sigma.numel() == 1 and x.shape[0] != 1:
        sigma = sigma.expand(x.shape[0])
    if label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros(x.shape[0], label_dim, device=x.device)
    return sigma, class_labels


class _Precond(nn.Module):
    """Shared forward; subclasses define ``coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)`` for sigma (B,)."""

    def __init__(self, backbone: nn.Module, img_resolution: int, img_channels: int, label_dim: int = 0):
        super().__init__()
        self.model = backbone
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim

    def coefficients(self, sigma: torch.Tensor):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                return_flag: str = "decoder", decoder_batch: int | None = None):
        check_return_flag(return_flag)
        sigma, class_labels = precond_inputs(x, sigma, class_labels, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        s = lambda v: edm.expand_sigma(v, x)  # noqa: E731 - broadcast (B,) against x
        split = {} if decoder_batch is None else {"decoder_batch": decoder_batch}  # only backbones that decode a part
        out = self.model(x * s(c_in), c_noise.flatten(), class_labels, return_flag=return_flag, **split)
        if return_flag in ("encoder", "features"):
            return out
        if return_flag == "encoder_decoder":
            f_x, logits = out
        else:
            f_x, logits = out, None
        n = x.shape[0] if decoder_batch is None else int(decoder_batch)  # the decoder ran on the first n samples
        d_x = s(c_skip)[:n] * x[:n] + s(c_out)[:n] * f_x.to(x.dtype)
        return d_x if return_flag == "decoder" else (d_x, logits)


class EDMPrecond(_Precond):
    """EDM: c_skip = sd²/(s²+sd²), c_out = s·sd/sqrt(s²+sd²), c_in = 1/sqrt(s²+sd²), c_noise = ln(s)/4."""

    def __init__(self, backbone: nn.Module, img_resolution: int, img_channels: int, label_dim: int = 0,
                 sigma_data: float = edm.SIGMA_DATA):
        super().__init__(backbone, img_resolution, img_channels, label_dim)
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        return edm.precond_coefficients(sigma, self.sigma_data)


class VPPrecond(_Precond):
    """Variance preserving (Song et al.'s DDPM++ cont.): c_skip = 1, c_out = -s, c_in = 1/sqrt(s²+1),
    c_noise = (M-1)·t(s), with sigma(t) = sqrt(exp(beta_d t²/2 + beta_min t) - 1) and t(s) its inverse."""

    def __init__(self, backbone: nn.Module, img_resolution: int, img_channels: int, label_dim: int = 0,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5):
        super().__init__(backbone, img_resolution, img_channels, label_dim)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Variance exploding (Song et al.'s NCSN++ cont.): c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2)."""

    def __init__(self, backbone: nn.Module, img_resolution: int, img_channels: int, label_dim: int = 0,
                 sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(backbone, img_resolution, img_channels, label_dim)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


PRECONDITIONERS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond}
