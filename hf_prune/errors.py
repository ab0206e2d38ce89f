"""Typed exceptions: every failure a user can act on has its own class, and says what to do."""


class HFPruneError(Exception):
    """Base class of every error hf_prune raises on purpose."""


class UsageError(HFPruneError):
    """The caller asked for something impossible; fixing the arguments fixes it (CLI exit code 2)."""


class UnsupportedArchitectureError(UsageError):
    """No architecture adapter is registered for the model's `model_type`."""


class DerivedAdapterError(UnsupportedArchitectureError):
    """No hand-written adapter exists and deriving one from a tiny instance of the config class failed, or
    verifying one of its kinds did (cut != masked, or no vanilla round trip): the message names the module
    and what could not be resolved; the kinds that passed stay available."""


class InvalidPruningTargetError(UsageError, ValueError):
    """A pruning target (fraction, count, combination) cannot be met for this model."""


class InvalidScheduleError(UsageError, ValueError):
    """A `PruningSchedule` (or how it meets the Trainer's step count) cannot be followed."""


class CallbackStateError(UsageError):
    """A resumed run cannot find or use the `PruningCallback` state of the checkpoint it resumes from."""


class GatesNotAttachedError(UsageError):
    """`score="l0"` found no hard-concrete gates in the model or its optimizer: attach them before `Trainer(...)`."""


class TeacherMismatchError(UsageError, ValueError):
    """The distillation `teacher`'s logits do not match the student's (another vocabulary or class count)."""


class OutputExistsError(UsageError, FileExistsError):
    """The output folder exists and is not empty, and `overwrite=True` was not given."""


class VanillaFormatError(UsageError):
    """`require_vanilla=True` was asked, but the model's config class cannot express the pruned shapes."""


class LowMemoryError(UsageError, ValueError):
    """`low_memory=True` was asked for something that needs the whole model at once (GGUF input,
    stage channels, a non-uniform allocation) or a checkpoint it cannot read shard by shard. Criteria
    that need whole-model passes raise `InvalidPruningTargetError` in every layer-by-layer mode."""


class DataNotFoundError(UsageError, FileNotFoundError):
    """Calibration or evaluation data is missing or empty; the message says where hf_prune looked."""


class NonFiniteError(UsageError, ValueError):
    """A weight, or what the calibration pass measured, holds NaN or Inf: raised before any score or
    least-squares solve, naming the tensor (or the layer whose statistics broke), the likely cause
    (a damaged checkpoint, float16 overflow, bad calibration data) and the fix."""


class PrunedCheckpointError(HFPruneError):
    """A folder is not a checkpoint hf_prune can load (missing files, unknown format version)."""


class NotPrunedError(HFPruneError):
    """An operation needs `prune()` to have run first."""


class RecipeError(UsageError, ValueError):
    """A YAML recipe is unreadable or holds an unknown key or a value its typed config refuses;
    the message names the file, the key and what is allowed."""


class PushError(HFPruneError):
    """Uploading a saved folder to the Hub failed; the folder is intact and the message says how to retry."""


class TracingError(UsageError):
    """Tracing found nothing the request can prune, or a cut would not reproduce the masked model
    (the forward uses sizes the graph does not show); the message names the groups involved."""


class MissingDependencyError(UsageError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it
    (`pip install "hf_prune[eval]"` for lm-evaluation-harness tasks)."""


class UnknownTaskError(UsageError, ValueError):
    """An evaluation task name neither the project nor lm-evaluation-harness knows; the message lists
    the local tasks and how to list the harness's."""
