"""SiDA: SiD with an adversarial loss whose discriminator is f_psi's encoder (SiDA paper eqs. 7-10)."""
from sida_core.methods.base import Method, Stage, register

SIDA = register(Method(
    name="sida", display="SiDA",
    summary="SiD + adversarial loss: psi by eqs. 9-10 on real and fake images, theta by eq. 8 after sid_until_kimg",
    adversarial_psi=True, final_stage=Stage.SIDA))
