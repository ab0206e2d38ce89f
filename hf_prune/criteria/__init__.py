"""How important a group is: one file per criterion, each registering itself."""

from ..plugins import import_plugins
from .base import Criterion, ScoringContext, group_tensors
from .registry import available_criteria, get_criterion, register_criterion

_INFRASTRUCTURE = {"base", "registry"}
import_plugins(__name__, __path__, _INFRASTRUCTURE)

__all__ = ["Criterion", "ScoringContext", "available_criteria", "get_criterion", "group_tensors", "register_criterion"]
