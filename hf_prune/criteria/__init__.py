"""How important a group is: one file per criterion, each registering itself."""

import importlib
import pkgutil

from .base import Criterion, ScoringContext, group_tensors
from .registry import available_criteria, get_criterion, register_criterion

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Criterion", "ScoringContext", "available_criteria", "get_criterion", "group_tensors", "register_criterion"]
