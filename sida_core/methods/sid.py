"""SiD: score identity distillation (SiDA paper eq. 6; Zhou et al. 2024). No adversarial term anywhere."""
from sida_core.methods.base import Method, Stage, register

SID = register(Method(
    name="sid", display="SiD", summary="score identity distillation: theta by eq. 6, psi by eq. 5 (no real data)",
    adversarial_psi=False, final_stage=Stage.SID))
