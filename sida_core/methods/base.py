"""What a distillation method declares (:class:`Method`) and the registry that is the only list of them.

Plain Python (no torch): the schemas import it to learn the allowed ``method`` values and what each needs.
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, Optional


class Stage(str, enum.Enum):
    """The three training stages of SiDA (paper appendix A; Algorithm 1 lines 10-12)."""

    FAKE_SCORE = "fake_score"  # only psi is trained
    SID = "sid"                # psi + theta with the SiD generator loss (eq. 6)
    SIDA = "sida"              # psi + theta with the SiDA generator loss (eq. 8)
    ADD = "add"                # discriminator heads + theta with ADD's adversarial + distillation loss (docs/methods/add.md)


@dataclass(frozen=True)
class Method:
    """One distillation method: its networks' roles and starting points, its stages, and where its losses live.

    Every method trains two networks by the same two-update step (:class:`sida_core.distill.Distiller`): first the
    *critic* (SiD family: the fake-score net f_psi, a copy of f_phi; ADD: the discriminator heads on a frozen feature
    network), then G_theta; f_phi stays frozen. ``impl`` names the torch module that builds the critic and the two
    losses (``build_critic(teacher, hyper)``, ``build_losses(hyper)``), imported only when a step is built, so this
    declaration stays importable without torch."""

    name: str  # the config's ``method`` value
    display: str  # as papers write it
    summary: str  # one line: what it is, where it is defined
    adversarial_psi: bool  # f_psi's loss carries the discriminator term (eqs. 9-10), fed real images, throughout
    final_stage: Stage  # the stage from ``stages.sid_until_kimg`` on (or after the warm-up without a SiD stage)
    generator_from: Literal["teacher", "sid_generator"] = "teacher"  # theta <- phi, or <- a SiD generator (init_generator)
    uses_real: Optional[bool] = None  # the critic update takes a real batch (default: adversarial_psi)
    sid_stage: bool = True  # a SiD stage between the warm-up and the final stage (stages.sid_until_kimg applies)
    critic: str = "fake_score"  # the critic's name in checkpoints and step stats
    impl: str = "sida_core.methods.sid_family_impl"  # torch module with build_critic(teacher, hyper) and build_losses(hyper)
    options: Optional[str] = None  # the config section holding this method's own options (e.g. ``add``)
    uses_alpha: bool = True  # its generator loss has SiD's alpha (eq. 6); labels show alpha only then

    @property
    def needs_real(self) -> bool:
        """The critic update needs real images (a data stream on every worker)."""
        return self.adversarial_psi if self.uses_real is None else self.uses_real

    @property
    def starts_from_generator(self) -> bool:
        """theta starts from an earlier run's generator (``init_generator`` / a staged pipeline's ``init_from``)."""
        return self.generator_from == "sid_generator"

    def implementation(self) -> ModuleType:
        """The torch module that builds this method's critic and losses (imported on first use)."""
        return importlib.import_module(self.impl)

    def stage_at(self, cur_nimg: int, fake_score_only_kimg: float, sid_until_kimg: float) -> Stage:
        """The one place where stage boundaries are decided, from images seen so far (counted globally):
        ``cur_nimg < fake_score_only_kimg*1000``: FAKE_SCORE (the critic alone); then SID until
        ``sid_until_kimg*1000`` for methods with a SiD stage; then the method's final stage."""
        if cur_nimg < fake_score_only_kimg * 1000:
            return Stage.FAKE_SCORE
        if self.sid_stage and cur_nimg < sid_until_kimg * 1000:
            return Stage.SID
        return self.final_stage


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {', '.join(map(repr, _REGISTRY))}, got {name!r}") from None
