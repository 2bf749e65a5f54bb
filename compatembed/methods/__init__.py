"""Training methods, one module per method, all behind :class:`compatembed.methods.base.Method`."""

from compatembed.methods.base import METHODS, Method, MethodContext, class_prototypes, freeze, list_methods
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
]
