"""EDM teacher: training on (small) data and EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1).

``train_teacher`` is for the built-in data on a CPU: Adam with linear lr ramp-up, EDM's loss (eq. 5 on real
data), and an EMA of the weights (the EMA network is the teacher). ``heun_sample`` with 18 steps costs
35 network evaluations.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

from sida_core import edm
from sida_core.distill import ema_beta, make_generator
from sida_core.loop import kimg_to_nimg
from sida_core.losses import EDMLoss


@torch.no_grad()
def heun_sample(net: nn.Module, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None, num_steps: int = 18,
                sigma_min: float = edm.SIGMA_MIN, sigma_max: float = edm.SIGMA_MAX, rho: float = edm.RHO) -> torch.Tensor:
    """EDM's 2nd-order Heun ODE sampler (S_churn = 0); ``latents`` ~ N(0, I). Uses 2*num_steps - 1 NFE."""
    t_steps = edm.heun_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = (x_cur - net(x_cur.float(), t_cur.float().expand(x_cur.shape[0]), class_labels).to(torch.float64)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next.float(), t_next.float().expand(x_cur.shape[0]), class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()


def train_teacher(net: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor], *, kimg: float, batch: int,
                  lr: float, lr_rampup_kimg: float, ema_halflife_kimg: float, p_mean: float = -1.2, p_std: float = 1.2,
                  seed: int = 0, device="cpu", progress: Optional[Callable[[int, float], None]] = None) -> nn.Module:
    """Train ``net`` as an EDM denoiser on ``images`` (N, C, H, W) in [-1, 1]; returns its EMA copy (eval mode)."""
    device = torch.device(device)
    net = net.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = EDMLoss(p_mean=p_mean, p_std=p_std)
    total = kimg_to_nimg(kimg)
    cur_nimg, step = 0, 0
    while cur_nimg < total:
        rng = make_generator(device, "teacher", seed, step)
        idx = torch.randint(images.shape[0], (batch,), generator=make_generator("cpu", "teacher-idx", seed, step))
        x = images[idx].to(device)
        c = labels[idx].to(device) if labels is not None else None
        loss = loss_fn(net, x, c, generator=rng).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher training: non-finite loss at step {step} (kimg {cur_nimg / 1000:.1f})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1.0) if lr_rampup_kimg > 0 else lr
        opt.step()
        cur_nimg += batch
        step += 1
        beta = ema_beta(batch, ema_halflife_kimg / 1000, cur_nimg, rampup=None)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
        if progress is not None:
            progress(batch, loss.item())
    return ema
