"""ADD: adversarial diffusion distillation (Sauer et al. 2023; seeds/add_review.txt), on the SiD pipeline's
teacher, data and step: a discriminator of trainable heads on the frozen teacher's encoder features (hinge loss,
optional R1) and a distillation loss to the teacher's denoised prediction. Equations: docs/methods/add.md."""
from sida_core.methods.base import Method, Stage, register

ADD = register(Method(
    name="add", display="ADD",
    summary="adversarial diffusion distillation: hinge discriminator heads on the frozen teacher's encoder + "
            "weighted L2 to the teacher's denoised prediction (docs/methods/add.md)",
    adversarial_psi=False, uses_real=True, final_stage=Stage.ADD, sid_stage=False, critic="discriminator",
    impl="sida_core.methods.add_impl", options="add", uses_alpha=False))
