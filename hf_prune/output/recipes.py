"""YAML recipes: the typed configs of the Python API, written down and checked.

`load_recipe` reads a recipe file into a `PruningConfig` (and the schedule and training sections beside
it); `recipe_yaml` writes one. What a recipe holds and how it is checked: `hf_prune.output.recipe_file`.
"""

from __future__ import annotations

import os

from ..config import PruningConfig
from .recipe_file import SECTIONS, Recipe, read_recipe, recipe_yaml

__all__ = ["SECTIONS", "Recipe", "load_recipe", "recipe_yaml"]


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file (see the module docstring)."""
    return read_recipe(path, PruningConfig)
