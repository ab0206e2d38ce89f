"""The YAML recipe file: reading and checking it, for any pruning-config class (no import of hf_prune.config).

`hf_prune.output.recipes.load_recipe` reads a recipe into a `PruningConfig`; `PruningConfig.from_yaml`
reads the same file into its own class. Both come here, so the config need not import the recipes.

A recipe is a mapping with these keys (the files in the repository's `recipes/` are examples):

    description: free text, shown by `hf-prune prune --dry-run`
    pruning:     PruningConfig fields (required)
    schedule:    PruningSchedule fields (training recipes: when the callback prunes)
    training:    transformers.TrainingArguments fields (training recipes)

Unknown keys are errors, and so is every value the typed configs refuse; each `RecipeError`
names the file, the key and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import InvalidPruningTargetError, InvalidScheduleError, RecipeError
from ..kinds import AMOUNTS
from ..training.schedule import PruningSchedule

if TYPE_CHECKING:
    from ..config import PruningConfig

SECTIONS = ("description", "pruning", "schedule", "training")


@dataclass(frozen=True)
class Recipe:
    pruning: PruningConfig
    description: str = ""
    schedule: PruningSchedule | None = None
    training: dict | None = None


def _type_name(default: object) -> str | None:
    """The type a field's default asks for (amounts excepted: the config checks those itself)."""
    for kind, name in ((bool, "a boolean"), (int, "an int"), (float, "a number"), (str, "a string")):
        if isinstance(default, kind):
            return name
    return None


def _matches(value: object, type_name: str) -> bool:
    checks = {
        "a boolean": isinstance(value, bool),
        "an int": isinstance(value, int) and not isinstance(value, bool),
        "a number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "a string": isinstance(value, str),
    }
    return checks[type_name]


def _typed(path: Path, section: str, cls: type, values: object, untyped: tuple[str, ...] = ()):
    """`cls(**values)` after checking keys and value types; the config's own errors gain the file name."""
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: '{section}' must be a mapping of {cls.__name__} fields, got {values!r}.")
    allowed = [f.name for f in fields(cls)]
    for key, value in values.items():
        if key not in allowed:
            raise RecipeError(f"{path}: unknown key '{section}.{key}'; allowed: {', '.join(allowed)}.")
        default = next(f.default for f in fields(cls) if f.name == key)
        type_name = None if key in untyped or default is MISSING else _type_name(default)
        if type_name and not _matches(value, type_name):
            raise RecipeError(f"{path}: '{section}.{key}' must be {type_name}, got {value!r}.")
    try:
        return cls(**values)
    except (InvalidPruningTargetError, InvalidScheduleError) as error:
        raise RecipeError(f"{path}: '{section}': {error}") from None


def _training(path: Path, values: object) -> dict:
    from transformers import TrainingArguments  # heavy: only for training recipes

    if not isinstance(values, dict):
        raise RecipeError(f"{path}: 'training' must be a mapping of TrainingArguments fields, got {values!r}.")
    allowed = {f.name for f in fields(TrainingArguments)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise RecipeError(
            f"{path}: unknown key 'training.{unknown[0]}'; allowed: the fields of transformers.TrainingArguments "
            "(learning_rate, num_train_epochs, per_device_train_batch_size, ...)."
        )
    return dict(values)


def read_recipe(path: str | os.PathLike, config_class: type[PruningConfig]) -> Recipe:
    """Read and check a recipe file (see `hf_prune.output.recipes`); its `pruning` section becomes a `config_class`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror or error}).") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error}).") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with the keys {', '.join(SECTIONS)}.")
    for key in data:
        if key not in SECTIONS:
            raise RecipeError(f"{path}: unknown key '{key}'; allowed: {', '.join(SECTIONS)}.")
    if "pruning" not in data:
        raise RecipeError(f"{path}: missing key 'pruning' (the PruningConfig fields).")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise RecipeError(f"{path}: 'description' must be a string, got {description!r}.")
    return Recipe(
        pruning=_typed(path, "pruning", config_class, data["pruning"], untyped=AMOUNTS),
        description=description.strip(),
        schedule=_typed(path, "schedule", PruningSchedule, data["schedule"]) if "schedule" in data else None,
        training=_training(path, data["training"]) if "training" in data else None,
    )


def recipe_yaml(pruning: dict, description: str = "") -> str:
    """A recipe file holding `pruning` (`PruningConfig.to_dict()`); `read_recipe` reads it back."""
    data = {"description": description} if description else {}
    data["pruning"] = pruning
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
