"""Training methods, one module per method, all behind :class:`compatembed.methods.base.Method`."""

from compatembed.methods.base import METHODS, Method, MethodContext, class_prototypes, freeze, list_methods
from compatembed.methods.independent import Independent

__all__ = ["METHODS", "Independent", "Method", "MethodContext", "class_prototypes", "freeze", "list_methods"]
