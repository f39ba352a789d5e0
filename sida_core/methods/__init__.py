"""Distillation methods as plug-ins: one module per method declares its networks' starting points, its stages and
whether f_psi is also the discriminator; everything else asks the registry (``get_method``), never ``if method ==``.

Adding a method = one module here (registered on import below) plus its tests.
"""
from sida_core.methods.base import Method, Stage, get_method, method_names, register
from sida_core.methods import sid, sida, sid2a  # noqa: F401,E402 -- registers them, in this order

__all__ = ["Method", "Stage", "get_method", "method_names", "register"]
