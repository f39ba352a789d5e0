"""What a distillation method declares (:class:`Method`) and the registry that is the only list of them.

Plain Python (no torch): the schemas import it to learn the allowed ``method`` values and what each needs.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


class Stage(str, enum.Enum):
    """The three training stages of SiDA (paper appendix A; Algorithm 1 lines 10-12)."""

    FAKE_SCORE = "fake_score"  # only psi is trained
    SID = "sid"                # psi + theta with the SiD generator loss (eq. 6)
    SIDA = "sida"              # psi + theta with the SiDA generator loss (eq. 8)


@dataclass(frozen=True)
class Method:
    """One distillation method of the SiD family: its networks' roles and starting points, and its stages.

    G_theta and f_psi are trained, f_phi frozen, for every method here; f_psi always starts as a copy of f_phi.
    The update itself is the family's psi-then-theta step (:class:`sida_core.distill.Distiller`), whose losses
    the stage selects (:func:`sida_core.losses.generator_weights`)."""

    name: str  # the config's ``method`` value
    display: str  # as papers write it
    summary: str  # one line: what it is, where it is defined
    adversarial_psi: bool  # f_psi's loss carries the discriminator term (eqs. 9-10), fed real images, throughout
    final_stage: Stage  # the stage from ``stages.sid_until_kimg`` on: SID (SiD stays there) or SIDA
    generator_from: Literal["teacher", "sid_generator"] = "teacher"  # theta <- phi, or <- a SiD generator (init_generator)

    @property
    def starts_from_generator(self) -> bool:
        """theta starts from an earlier run's generator (``init_generator`` / a staged pipeline's ``init_from``)."""
        return self.generator_from == "sid_generator"

    def stage_at(self, cur_nimg: int, fake_score_only_kimg: float, sid_until_kimg: float) -> Stage:
        """The one place where stage boundaries are decided, from images seen so far (counted globally):
        ``cur_nimg < fake_score_only_kimg*1000``: FAKE_SCORE; then SID until ``sid_until_kimg*1000``; then the
        method's final stage."""
        if cur_nimg < fake_score_only_kimg * 1000:
            return Stage.FAKE_SCORE
        if cur_nimg < sid_until_kimg * 1000:
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
