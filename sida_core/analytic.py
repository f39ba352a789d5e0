"""Analytic teachers: a Gaussian mixture over "images" and its exact EDM denoiser E[x0 | x_t].

Under the EDM forward process x_t = x0 + sigma * eps (a_t = 1, SPEC.md) the marginal of a Gaussian mixture
sum_k w_k N(m_k, diag(s_k^2)) is the mixture sum_k w_k N(m_k, diag(s_k^2 + sigma^2)), so the optimal denoiser
is closed-form:

    E[x0 | x_t = x] = sum_k r_k(x) [ m_k + s_k^2 / (s_k^2 + sigma^2) (x - m_k) ],
    r_k(x) = softmax_k( ln w_k + ln N(x; m_k, diag(s_k^2 + sigma^2)) ).

:class:`ExactDenoiser` evaluates this in float64 (log-sum-exp responsibilities), differentiably in ``x`` so a
generator loss can back-propagate through it, and with the call signature of the project's EDM-preconditioned
networks. It is a perfect frozen teacher f_phi for tests of the distillation method. Plain torch.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def _as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


class GaussianMixture:
    """sum_k w_k N(m_k, diag(s_k^2)) over tensors of shape ``shape`` (e.g. (C, H, W)).

    ``means``: (K, *shape) or (K, D) with D = prod(shape). ``stds``: a scalar, (K,) (isotropic per component),
    or (K, D)/(K, *shape) (diagonal). ``weights``: (K,), normalised here; uniform if omitted. Stored in float64.
    """

    def __init__(self, means, stds, weights=None, shape: int | Sequence[int] | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *shape), got {tuple(means.shape)}")
        self.shape = _as_shape(shape) if shape is not None else tuple(means.shape[1:])
        self.dim = math.prod(self.shape)
        k = means.shape[0]
        if means[0].numel() != self.dim:
            raise ValueError(f"means {tuple(means.shape)} do not match shape {self.shape}")
        self.means = means.reshape(k, self.dim).clone()
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(k)
        if stds.ndim == 1:
            if stds.shape[0] != k:
                raise ValueError(f"stds of shape {tuple(stds.shape)} must have K={k} entries")
            stds = stds[:, None].expand(k, self.dim)
        stds = stds.reshape(k, -1)
        if stds.shape != (k, self.dim):
            raise ValueError(f"stds must be a scalar, (K,), or (K, D); got {tuple(stds.shape)}")
        if not bool((stds >= 0).all()):
            raise ValueError("stds must be non-negative")
        self.stds = stds.clone()
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.shape[0] != k or not bool((weights > 0).all()):
            raise ValueError(f"weights must be K={k} positive numbers, got {weights.tolist()}")
        self.weights = weights / weights.sum()

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n samples of shape (n, *shape); draws on CPU (reproducible with a CPU ``generator``), then moves."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp] * eps
        return x.reshape(n, *self.shape).to(device=device, dtype=dtype)

    def mean(self) -> torch.Tensor:
        """Exact mean, flattened (D,), float64."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Exact covariance of the flattened vector (D, D), float64: sum_k w_k (S_k + m_k m_k^T) - mu mu^T."""
        mu = self.mean()
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + torch.diag(self.weights @ self.stds.square())
        return second - torch.outer(mu, mu)

    def shifted(self, delta) -> "GaussianMixture":
        """The same mixture with every mean moved by ``delta`` (scalar, (D,), shape, or (K, D))."""
        delta = torch.as_tensor(delta, dtype=torch.float64)
        k, d = self.means.shape
        if delta.numel() == d:
            delta = delta.reshape(1, d)
        elif delta.numel() == k * d:
            delta = delta.reshape(k, d)
        elif delta.numel() != 1:
            raise ValueError(f"delta of shape {tuple(delta.shape)} fits neither one mean ({d}) nor all ({k}x{d})")
        return GaussianMixture(self.means + delta, self.stds, self.weights, shape=self.shape)

    def denoiser(self) -> "ExactDenoiser":
        return ExactDenoiser(self)


class ExactDenoiser(nn.Module):
    """Closed-form E[x0 | x_t = x] of a :class:`GaussianMixture`, called like the project's denoisers.

    ``forward(x, sigma, class_labels=None, return_flag="decoder")`` with x of shape (B, *shape) and sigma a
    scalar or (B,) tensor (> 0). Only ``return_flag="decoder"`` exists: this module is only ever a frozen
    teacher; it has no encoder and cannot act as a discriminator. No parameters (buffers only), so it is
    frozen by construction; it is differentiable with respect to ``x``.
    """

    means: torch.Tensor  # buffers (registered in __init__)
    variances: torch.Tensor
    log_weights: torch.Tensor

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.img_shape = mixture.shape
        self.img_channels = mixture.shape[0] if len(mixture.shape) == 3 else None
        self.img_resolution = mixture.shape[-1] if len(mixture.shape) == 3 else None
        self.label_dim = 0
        self.register_buffer("means", mixture.means.clone())           # (K, D) float64
        self.register_buffer("variances", mixture.stds.square())        # (K, D)
        self.register_buffer("log_weights", mixture.weights.log())      # (K,)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, return_flag: str = "decoder") -> torch.Tensor:
        if return_flag != "decoder":
            raise ValueError(
                f"ExactDenoiser is an analytic frozen teacher and only supports return_flag='decoder' "
                f"(it has no encoder / discriminator logits); got {return_flag!r}")
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        if xf.shape[1] != self.means.shape[1]:
            raise ValueError(f"input of shape {tuple(x.shape)} does not match the mixture's shape {self.img_shape}")
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(b)
        if sigma.shape[0] != b:
            raise ValueError(f"sigma must be a scalar or have one entry per sample ({b}), got {tuple(sigma.shape)}")
        s2 = sigma.square()[:, None, None]                              # (B, 1, 1)
        tot = self.variances[None] + s2                                 # (B, K, D): marginal variances at sigma
        diff = xf[:, None, :] - self.means[None]                        # (B, K, D)
        log_p = self.log_weights[None] - 0.5 * (tot.log() + diff.square() / tot).sum(-1)  # (B, K), drops 2*pi
        resp = torch.softmax(log_p, dim=1)                              # log-sum-exp normalised
        post = self.means[None] + (self.variances[None] / tot) * diff  # per-component posterior means
        out = torch.einsum("bk,bkd->bd", resp, post)
        return out.to(x.dtype).reshape(x.shape)
