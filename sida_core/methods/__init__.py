"""Distillation methods as plug-ins: one module per method declares its networks' starting points, its stages and
whether f_psi is also the discriminator; everything else asks the registry (``get_method``), never ``if method ==``.

Adding a method = one module here (registered on import below) plus its tests; a method whose critic or losses
differ from the SiD family's names its own torch module (``Method.impl``, e.g. ``add_impl``).
"""
from sida_core.methods.base import Method, Stage, get_method, method_names, register
# registration order = the order users see them listed in
from sida_core.methods import sid  # noqa: F401,E402,I001
from sida_core.methods import sida  # noqa: F401,E402
from sida_core.methods import sid2a  # noqa: F401,E402
from sida_core.methods import add  # noqa: F401,E402

__all__ = ["Method", "Stage", "get_method", "method_names", "register"]
