"""ADD's critic and losses (``method: add``; docs/methods/add.md states the equations and the choices made).

* Discriminator: the frozen teacher's encoder as the feature network (``return_flag='features'``: its output at
  each resolution), read at the fixed noise level ``add.feature_sigma`` on the clean image, and one trainable head
  per resolution (3x3 conv -> leaky ReLU -> 1x1 conv -> a logit map). Only the heads are parameters of the critic;
  the feature network is the teacher itself, held outside the module tree, so it is never trained, never copied
  into checkpoints and never synchronised by DDP.
* Critic loss (hinge, ADD eq. 4): ``sum_k mean relu(1 - D_k(x_real)) + mean relu(1 + D_k(x_g))`` per sample,
  plus ``r1_gamma / 2 * ||grad_x sum_k mean D_k(x_real)||^2`` (optional R1 on real data).
* Generator loss (ADD eqs. 2, 3, 5): ``-lambda_adv sum_k mean D_k(x_g)`` + ``lambda_distill c(sigma) mean_pixels
  (x_g - sg(f_phi(x_g + sigma n; sigma)))^2`` with sigma drawn as in SiD's generator step (``loss.t_max``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from sida_core import edm
from sida_core.distill import derive_seed

#: The weighting functions c(sigma) of the distillation loss (docs/methods/add.md), EDM's sigma throughout.
WEIGHTINGS = ("exponential", "sds")


def distill_weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """c(sigma): ``exponential`` = abar = 1 / (1 + sigma^2) (the VP signal level at the same SNR: noisier levels
    count less); ``sds`` = omega / (2 sigma) with DreamFusion's omega = sigma^2 / (1 + sigma^2), which makes the
    gradient of c ||x - x_hat||^2 equal to SDS's omega (eps_hat - eps) (x - x_hat = sigma (eps_hat - eps))."""
    sigma = sigma.float()
    if weighting == "exponential":
        return 1.0 / (1.0 + sigma.square())
    if weighting == "sds":
        return sigma / (2.0 * (1.0 + sigma.square()))
    raise ValueError(f"add.distill_weighting must be one of {WEIGHTINGS}, got {weighting!r}")


class DiscriminatorHead(nn.Module):
    """One lightweight head: features (B x C x h x w) -> logit map (B x 1 x h x w)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(F.leaky_relu(self.conv(f), 0.2)).float()


class FeatureDiscriminator(nn.Module):
    """ADD's discriminator: a frozen feature network (a denoiser read with ``return_flag='features'``) and one
    trainable :class:`DiscriminatorHead` per feature map. ``forward(x, labels)`` -> the list of logit maps."""

    feature_net: nn.Module  # set in __init__ outside the module tree

    def __init__(self, features: nn.Module, *, hidden: int = 64, sigma: float = 0.002):
        super().__init__()
        object.__setattr__(self, "feature_net", features)  # not a submodule: frozen, shared, not in state_dict
        self.sigma = float(sigma)
        net: Any = getattr(features, "module", features)
        channels, resolution = int(net.img_channels), int(net.img_resolution)
        device = next(features.parameters()).device
        label_dim = int(getattr(net, "label_dim", 0) or 0)
        with torch.no_grad():
            probe = self._features(torch.zeros(1, channels, resolution, resolution, device=device),
                                   torch.zeros(1, label_dim, device=device) if label_dim else None)
        self.heads = nn.ModuleList(DiscriminatorHead(int(f.shape[1]), hidden) for f in probe).to(device)

    def _features(self, x: torch.Tensor, labels: Optional[torch.Tensor]) -> list[torch.Tensor]:
        sigma = torch.full((x.shape[0],), self.sigma, device=x.device)
        return self.feature_net(x, sigma, labels, return_flag="features")

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.heads, self._features(x, labels))]


def logit_sum(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per sample: the sum over heads of each logit map's mean, shape (B,)."""
    return torch.stack([m.flatten(1).mean(1) for m in maps]).sum(0)


def _hinge(maps: list[torch.Tensor], sign: float) -> torch.Tensor:
    """Per sample: sum over heads of mean relu(1 + sign * D_k) (sign -1 for real, +1 for fake)."""
    return torch.stack([F.relu(1.0 + sign * m).flatten(1).mean(1) for m in maps]).sum(0)


@dataclass
class HingeDiscriminatorLoss:
    """Critic loss per sample: hinge on the (x_real_i, x_g,i) pair of the micro-batch plus optional R1."""

    r1_gamma: float = 0.0

    def __call__(self, disc, x_g, labels=None, x_real=None, real_labels=None, generator=None):
        if x_real is None:
            raise ValueError("the ADD discriminator loss needs a real batch (x_real)")
        if x_real.shape != x_g.shape:
            raise ValueError(f"real batch shape {tuple(x_real.shape)} must equal fake batch shape {tuple(x_g.shape)}")
        fake = disc(x_g.detach(), labels)
        x_real = x_real.detach().requires_grad_(self.r1_gamma > 0)
        real = disc(x_real, real_labels)
        loss = _hinge(real, -1.0) + _hinge(fake, 1.0)
        stats = {"d_real": logit_sum(real).detach().mean(), "d_fake": logit_sum(fake).detach().mean()}
        if self.r1_gamma > 0:
            (grad,) = torch.autograd.grad(logit_sum(real).sum(), x_real, create_graph=True)
            r1 = grad.square().flatten(1).sum(1)  # the input is fp32 (or fp64), so is its gradient
            loss = loss + self.r1_gamma / 2 * r1
            stats["loss_r1"] = r1.detach().mean()
        stats["loss_adv_psi"] = loss.detach().mean()
        return loss, stats


@dataclass
class ADDGeneratorLoss:
    """Generator loss per sample: adversarial (non-saturating hinge form, -D) + weighted distillation to the
    teacher's denoised prediction of the diffused sample (stop-gradient target). The stage is not used: ADD
    trains with the same loss from the end of the critic warm-up on."""

    lambda_adv: float = 1.0
    lambda_distill: float = 2.5
    weighting: str = "exponential"
    t_max: float = 800.0

    def __call__(self, teacher, disc, x_g, labels, stage=None, generator=None):
        sigma = edm.sample_sid_sigma(x_g.shape[0], self.t_max, device=x_g.device, generator=generator)
        n = torch.randn(x_g.shape, device=x_g.device, generator=generator, dtype=x_g.dtype)
        with torch.no_grad():
            target = teacher(x_g.detach() + edm.expand_sigma(sigma, x_g) * n, sigma, labels).float()
        c = distill_weight(sigma, self.weighting)
        loss_distill = self.lambda_distill * c * (x_g.float() - target).square().flatten(1).mean(1)
        loss_adv = -self.lambda_adv * logit_sum(disc(x_g, labels))
        return loss_adv + loss_distill, {"loss_distill": loss_distill.detach().mean(),
                                         "loss_adv_theta": loss_adv.detach().mean()}


def build_critic(teacher: nn.Module, hyper) -> nn.Module:
    """The discriminator: trainable heads on the frozen teacher's encoder features. The heads' initial weights are a
    function of the run's seed alone (not of the process's random state), so every worker and every rerun starts
    from the same discriminator."""
    o = hyper.method_options
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(hyper.seed, "add-discriminator-heads"))
        return FeatureDiscriminator(teacher, hidden=int(o["head_channels"]), sigma=float(o["feature_sigma"])).train()


def build_losses(hyper) -> tuple[HingeDiscriminatorLoss, ADDGeneratorLoss]:
    """(critic loss, generator loss) from a :class:`~sida_core.distill.StepHyper` whose ``method_options`` are
    the validated ``add:`` section (``schemas.run.AddOptions``, the one place their defaults live)."""
    o = hyper.method_options
    return (HingeDiscriminatorLoss(r1_gamma=float(o["r1_gamma"])),
            ADDGeneratorLoss(lambda_adv=float(o["lambda_adv"]), lambda_distill=float(o["lambda_distill"]),
                             weighting=str(o["distill_weighting"]), t_max=hyper.t_max))
