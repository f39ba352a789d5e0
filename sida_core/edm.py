"""EDM formulation used throughout (Karras et al. 2022; SPEC.md "Networks", "Fake-score step", "Generator step").

One place for: preconditioning coefficients, the training-time sigma distribution of the fake-score
loss, the SiD time schedule sigma(t) with t ~ U[0, t_max/1000], and the weights gamma(sigma) and
the stop-gradient normaliser that implements omega(t) a_t^2 / sigma_t^4.
"""
from __future__ import annotations

import torch

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0

def precond_coefficients(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """EDM preconditioning: returns (c_skip, c_out, c_in, c_noise) for noise level ``sigma``."""
    s2 = sigma**2
    sd2 = sigma_data**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1.0 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise

def sample_training_sigma(n: int, p_mean: float, p_std: float, *, device=None, generator=None) -> torch.Tensor:
    """Fake-score / teacher training noise: ln(sigma) ~ N(P_mean, P_std^2) (EDM's lognormal)."""
    rnd = torch.randn(n, device=device, generator=generator)
    return (rnd * p_std + p_mean).exp()

def gamma_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """gamma(t) of eqs. 5/9: EDM's loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2

def sid_sigma(t: torch.Tensor, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """SiD noise level for t in [0, 1]: (s_max^(1/rho) + (1 - t)(s_min^(1/rho) - s_max^(1/rho)))^rho.

    t = 1 gives sigma_max, t = 0 gives sigma_min; with t_max = 800, t <= 0.8 gives sigma <= ~24.4.
    """
    a = sigma_max ** (1.0 / rho)
    b = sigma_min ** (1.0 / rho)
    return (a + (1.0 - t) * (b - a)) ** rho

def sample_sid_sigma(n: int, t_max: float, *, device=None, generator=None) -> torch.Tensor:
    """Algorithm 1 line 11: t ~ U[0, t_max/1000] per sample, mapped to sigma(t)."""
    t = torch.rand(n, device=device, generator=generator) * (t_max / 1000.0)
    return sid_sigma(t)

def sid_normaliser(x_g: torch.Tensor, y_real: torch.Tensor, floor: float = 1e-5) -> torch.Tensor:
    """w_i: the stop-gradient stand-in for 1 / (omega(t) a_t^2 / sigma_t^4) (SPEC.md, generator step).

    Mean over C, H, W (all non-batch dims) of |x_g - y_real|, clipped below at ``floor``; shape B×1×…×1.
    """
    dims = tuple(range(1, x_g.ndim))
    w = (x_g - y_real).detach().abs().mean(dim=dims, keepdim=True)
    return w.clamp_min(floor)

def heun_sigma_steps(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                     device=None) -> torch.Tensor:
    """EDM's sampling time steps t_0 = sigma_max > ... > t_{N-1} = sigma_min, then t_N = 0."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=t.dtype, device=device)])

def heun_nfe(num_steps: int) -> int:
    """Number of function evaluations of EDM's Heun sampler (2N - 1: no correction on the last step)."""
    return 2 * num_steps - 1

def expand_sigma(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample sigma (B,) to broadcast against ``like`` (B, ...)."""
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

