"""Dependency groups traced from the computation graph, for models without an architecture adapter.

graph.py exports the model and labels its channels; groups.py turns tied channels into families of
groups and a report of what is left alone; scoring.py ranks groups; pruner.py masks, cuts, checks
and saves; checkpoint.py loads a saved cut into a freshly built model.
"""

from .groups import TracedGroups
from .pruner import TracedPruner, TracedPruningReport

__all__ = ["TracedGroups", "TracedPruner", "TracedPruningReport"]
