"""The SiD family's critic and losses (``sid``, ``sida``, ``sid2a``): f_psi <- a copy of f_phi, trained by eq. 5
(SiD) or eqs. 9-10 (SiDA, SiD²A); G_theta by eq. 6 in the SiD stage and eq. 8 in the SiDA stage.

Imported by :meth:`sida_core.methods.Method.implementation` when a step is built (torch lives here, not in the
method declarations)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sida_core.distill import init_fake_score
from sida_core.losses import FakeScoreLoss, GeneratorLoss, generator_weights
from sida_core.methods.base import Stage, get_method


def build_critic(teacher: nn.Module, hyper) -> nn.Module:
    """f_psi <- f_phi (SPEC "Initialisation"; :func:`~sida_core.distill.init_fake_score`)."""
    return init_fake_score(teacher, use_logvar=hyper.fake_score_logvar)


@dataclass
class StagedGeneratorLoss:
    """:class:`~sida_core.losses.GeneratorLoss` with (w_sid, w_adv) from the stage (Algorithm 1 line 14)."""

    loss: GeneratorLoss

    def __call__(self, teacher, critic, x_g, labels, stage: Stage, generator=None):
        w_sid, w_adv = generator_weights(stage)
        return self.loss(teacher, critic, x_g, labels, w_sid=w_sid, w_adv=w_adv, generator=generator)


def build_losses(hyper) -> tuple[FakeScoreLoss, StagedGeneratorLoss]:
    """(critic loss, generator loss) for a :class:`~sida_core.distill.StepHyper` of a SiD-family method."""
    h = hyper
    fake = FakeScoreLoss(lambda_adv_psi=h.lambda_adv_psi, p_mean=h.p_mean, p_std=h.p_std,
                         use_adv=get_method(h.method).adversarial_psi, use_logvar=h.fake_score_logvar,
                         single_forward=h.performance.single_psi_forward)
    gen = GeneratorLoss(alpha=h.alpha, lambda_sid=h.lambda_sid, lambda_adv_theta=h.lambda_adv_theta, t_max=h.t_max)
    return fake, StagedGeneratorLoss(gen)
