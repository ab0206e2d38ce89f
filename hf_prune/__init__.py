"""hf_prune: structural pruning for Hugging Face transformers models."""

from . import derivation  # noqa: F401 (registers derived adapters as get_adapter's fallback)
from .config import PruningConfig
from .engine import low_memory as _low_memory  # noqa: F401 (defines HFPruner.shard_reader, for low_memory=True)
from .errors import (
    HFPruneError,
    InvalidPruningTargetError,
    LowMemoryError,
    NonFiniteError,
    NotPrunedError,
    OutputExistsError,
    PrunedCheckpointError,
    PushError,
    RecipeError,
    TracingError,
    UnsupportedArchitectureError,
    UsageError,
    VanillaFormatError,
)
from .kinds import __version__ as __version__  # defined in kinds.py: modules read it without this __init__
from .output.checkpoint import load_pruned
from .pruner import HFPruner
from .report import PruningReport
from .training.callback import PruningCallback
from .training.distillation import Distillation
from .training.schedule import PruningSchedule

__all__ = [
    "Distillation",
    "HFPruneError",
    "HFPruner",
    "InvalidPruningTargetError",
    "LowMemoryError",
    "NonFiniteError",
    "NotPrunedError",
    "OutputExistsError",
    "PrunedCheckpointError",
    "PruningCallback",
    "PruningConfig",
    "PruningReport",
    "PruningSchedule",
    "PushError",
    "RecipeError",
    "TracingError",
    "UnsupportedArchitectureError",
    "UsageError",
    "VanillaFormatError",
    "load_pruned",
]
