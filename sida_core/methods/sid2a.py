"""SiD²A: SiDA whose generator starts from a SiD generator (the SiDA paper's best numbers), not from the teacher."""
from sida_core.methods.base import Method, Stage, register

SID2A = register(Method(
    name="sid2a", display="SiD²A", summary="SiDA with theta initialised from a SiD generator checkpoint (init_generator)",
    adversarial_psi=True, final_stage=Stage.SIDA, generator_from="sid_generator"))
