"""SiD / SiDA losses (SiDA paper eqs. 5-10, Algorithm 1; SPEC.md "Fake-score step", "Generator step").

Each loss is a small callable returning a **per-sample** loss vector (B,); the training step sums it and
divides by the per-worker total batch (per-worker batch x accumulation rounds), as SPEC.md states. The
adversarial terms average over the micro-batch they are given: call them once per worker micro-batch,
which is what makes the "per-GPU-batch fakeness" of eq. 7 hold on any number of workers.

Networks are EDM-preconditioned denoisers ``net(x, sigma, labels, return_flag=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.profiler import record_function

from sida_core import edm
from sida_core.methods.base import Stage


def generator_weights(stage: Stage) -> tuple[float, float]:
    """(weight of L_sid, weight of L_adv) in the generator loss: Algorithm 1 line 14's (1/2)^b and b/2."""
    if stage is Stage.FAKE_SCORE:
        return 0.0, 0.0
    if stage is Stage.SID:
        return 1.0, 0.0
    return 0.5, 0.5


def generate(generator, z: torch.Tensor, labels: torch.Tensor | None, sigma_init: float) -> torch.Tensor:
    """One-step generator x_g = G_theta(sigma_init * z, c) = D_theta(sigma_init z; sigma_init, c)."""
    sigma = torch.full((z.shape[0],), float(sigma_init), device=z.device)
    return generator(sigma_init * z, sigma, labels)


def _bce_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Mean binary cross-entropy with logits over the whole micro-batch and map (eqs. 7, 10)."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))


def check_logvar_head(net) -> None:
    """Refuse (one-line ValueError) a fake-score net without EDM2's logvar head u(sigma) (``logvar_linear``)."""
    plain = getattr(net, "module", net)  # under a DDP wrapper
    if getattr(plain, "logvar_linear", None) is None:
        raise ValueError(f"loss.fake_score_logvar=true needs a fake-score net with a logvar head (network.arch edm2), "
                         f"got {type(plain).__name__}")


@dataclass
class FakeScoreLoss:
    """Fake-score loss, eqs. 5 and 9-10.

    L_psi,i = gamma(sigma_i) [ ||f_psi(x_g,i + n_i) - x_g,i||^2
                              + lambda_adv_psi * (BCE(D(x_real + n), 1) + BCE(D(x_g + n), 0)) / 2 ]
    with n = sigma * eps shared by the fake and the real batch, sigma ~ exp(N(P_mean, P_std^2)), and each BCE
    the mean over the micro-batch and the logit map. ``use_adv=False`` gives SiD's eq. 5.

    ``use_logvar`` (SPEC "EDM2"; EDM2 eq. 21): the denoising term becomes gamma ||f_psi - x_g||^2 / e^u + u, with
    u = u_psi(sigma_i) the fake-score net's logvar head (``return_logvar=True``); the adversarial term is unchanged.

    ``single_forward`` (``performance.single_psi_forward``): the same loss from one pass of f_psi over the
    concatenated [x_g + n; x_real + n] batch, decoding the fake half only (exact per sample; see
    ``networks.songunet.decoder_inputs``).
    """

    lambda_adv_psi: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = edm.SIGMA_DATA
    use_adv: bool = True
    use_logvar: bool = False
    single_forward: bool = False

    def __call__(self, fake_score, x_g, labels=None, x_real=None, real_labels=None, generator=None):
        x_g = x_g.detach()
        sigma = edm.sample_training_sigma(x_g.shape[0], self.p_mean, self.p_std, device=x_g.device, generator=generator)
        n = edm.expand_sigma(sigma, x_g) * torch.randn(x_g.shape, device=x_g.device, generator=generator, dtype=x_g.dtype)
        weight = edm.gamma_weight(sigma, self.sigma_data)
        if self.use_logvar:
            check_logvar_head(fake_score)
        if not self.use_adv:
            if self.use_logvar:
                y_fake, u = fake_score(x_g + n, sigma, labels, return_logvar=True)
                return self._logvar_denoise(weight, y_fake, x_g, u), {"logvar": u.detach().mean()}
            y_fake = fake_score(x_g + n, sigma, labels)
            return weight * (y_fake.float() - x_g.float()).square().flatten(1).sum(1), {}
        if x_real is None:
            raise ValueError("FakeScoreLoss with use_adv=True needs a real batch (x_real)")
        if x_real.shape != x_g.shape:
            raise ValueError(f"real batch shape {tuple(x_real.shape)} must equal fake batch shape {tuple(x_g.shape)}")
        y_fake, l_fake, l_real, u = self._forward(fake_score, x_g + n, x_real + n, sigma, labels, real_labels)
        adv = (_bce_logits(l_real, 1.0) + _bce_logits(l_fake, 0.0)) / 2
        stats = {"d_real": l_real.detach().mean(), "d_fake": l_fake.detach().mean(), "loss_adv_psi": adv.detach()}
        if self.use_logvar:
            stats["logvar"] = u.detach().mean()
            return self._logvar_denoise(weight, y_fake, x_g, u) + weight * self.lambda_adv_psi * adv, stats
        denoise = (y_fake.float() - x_g.float()).square().flatten(1).sum(1)
        return weight * (denoise + self.lambda_adv_psi * adv), stats

    def _forward(self, fake_score, x_fake, x_real, sigma, labels, real_labels):
        """(f_psi(x_fake), logits(x_fake), logits(x_real), u(sigma) or None): two forwards, or with
        ``single_forward`` one encoder pass over [x_fake; x_real] and the decoder over the fake half only."""
        kw = {"return_logvar": True} if self.use_logvar else {}
        if not self.single_forward:
            out = fake_score(x_fake, sigma, labels, return_flag="encoder_decoder", **kw)
            l_real = fake_score(x_real, sigma, real_labels, return_flag="encoder")
            return out[0], out[1], l_real, (out[2] if self.use_logvar else None)
        b = x_fake.shape[0]
        if (labels is None) != (real_labels is None):  # a conditional net given labels on one side only: zeros
            labels = torch.zeros_like(real_labels) if labels is None else labels
            real_labels = torch.zeros_like(labels) if real_labels is None else real_labels
        both = None if labels is None else torch.cat([labels, real_labels])
        out = fake_score(torch.cat([x_fake, x_real]), torch.cat([sigma, sigma]), both, return_flag="encoder_decoder",
                         decoder_batch=b, **kw)
        return out[0], out[1][:b], out[1][b:], (out[2] if self.use_logvar else None)

    @staticmethod
    def _logvar_denoise(weight, y_fake, x_g, u):
        """gamma_i ||y_fake,i - x_g,i||^2 / e^{u_i} + u_i per sample (EDM2 eq. 21's loss, SPEC "EDM2")."""
        u = u.float().reshape(-1)
        return weight * (y_fake.float() - x_g.float()).square().flatten(1).sum(1) / u.exp() + u


@dataclass
class GeneratorLoss:
    """Generator loss: SiD (eq. 6) and SiDA (eq. 8), Algorithm 1 lines 11-15.

    With t ~ U[0, t_max/1000], sigma = sigma(t), x_t = x_g + sigma eps, y_real = f_phi(x_t), (y_fake, l) = f_psi(x_t)
    and the normaliser w_i = mean|x_g,i - y_real,i| (stop-gradient; implements omega(t) a_t^2 / sigma_t^4):
      L_sid,i = lambda_sid * sum_pixels (y_real - y_fake) * ((y_real - x_g) - alpha (y_real - y_fake)) / w_i
              = lambda_sid * [(1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g)] / w_i
      L_adv,i = lambda_adv_theta * C*H*W * BCE(clamp(l, -10, 10), 1) / w_i     (BCE averaged over the micro-batch)
    Returns w_sid * L_sid,i + w_adv * L_adv,i per sample; (w_sid, w_adv) come from :func:`generator_weights`.
    Gradients reach theta through x_g (directly and through the inputs of f_phi and f_psi); the caller keeps
    psi's and phi's parameters out of the update.
    """

    alpha: float = 1.0
    lambda_sid: float = 100.0
    lambda_adv_theta: float = 0.01
    t_max: float = 800.0

    def __call__(self, teacher, fake_score, x_g, labels=None, w_sid: float = 1.0, w_adv: float = 0.0, generator=None):
        sigma = edm.sample_sid_sigma(x_g.shape[0], self.t_max, device=x_g.device, generator=generator)
        x_t = x_g + edm.expand_sigma(sigma, x_g) * torch.randn(x_g.shape, device=x_g.device, generator=generator, dtype=x_g.dtype)
        with record_function("teacher forward"):
            y_real = teacher(x_t, sigma, labels).float()
        xg = x_g.float()
        stats = {}
        with record_function("psi forward"):
            if w_adv:
                y_fake, logits = fake_score(x_t, sigma, labels, return_flag="encoder_decoder")
            else:
                y_fake, logits = fake_score(x_t, sigma, labels), None
        y_fake = y_fake.float()
        w = edm.sid_normaliser(xg, y_real)
        s = (y_real - y_fake) * ((y_real - xg) - self.alpha * (y_real - y_fake)) / w
        loss_sid = self.lambda_sid * s.flatten(1).sum(1)
        loss = w_sid * loss_sid
        stats["loss_sid"] = loss_sid.detach().mean()
        if w_adv:
            chw = x_g[0].numel()
            a = _bce_logits(logits.clamp(-10, 10), 1.0)
            loss_adv = self.lambda_adv_theta * chw * a / w.flatten()
            loss = loss + w_adv * loss_adv
            stats["loss_adv_theta"] = loss_adv.detach().mean()
        return loss, stats


@dataclass
class EDMLoss:
    """EDM denoising loss for training a teacher: gamma(sigma) ||D(x + n; sigma) - x||^2 (= eq. 5 on real data)."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = edm.SIGMA_DATA

    def __call__(self, net, x, labels=None, generator=None):
        sigma = edm.sample_training_sigma(x.shape[0], self.p_mean, self.p_std, device=x.device, generator=generator)
        n = edm.expand_sigma(sigma, x) * torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        y = net(x + n, sigma, labels)
        return edm.gamma_weight(sigma, self.sigma_data) * (y.float() - x.float()).square().flatten(1).sum(1)
