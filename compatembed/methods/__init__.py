"""Training methods, one module per method, all behind :class:`compatembed.methods.base.Method`.

:func:`list_methods` finds every method of this package by importing its modules; the imports below are
the public names, not the registry.
"""

from compatembed.methods.base import METHODS, Method, MethodContext, class_prototypes, freeze, list_methods, method_class
from compatembed.methods.bct import BCT
from compatembed.methods.bt2 import BT2, BT2Embedder
from compatembed.methods.fct import FCT
from compatembed.methods.independent import Independent
from compatembed.methods.lambda_orth import LambdaOrth
from compatembed.methods.oca import OCA

__all__ = [
    "BCT",
    "BT2",
    "BT2Embedder",
    "FCT",
    "METHODS",
    "Independent",
    "LambdaOrth",
    "Method",
    "MethodContext",
    "OCA",
    "class_prototypes",
    "freeze",
    "list_methods",
    "method_class",
]
