"""`model_type` → architecture adapter. Adding an architecture is adding one decorated file."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PretrainedConfig

from ..errors import UnsupportedArchitectureError
from .base import ArchitectureAdapter

_ADAPTERS: dict[str, type[ArchitectureAdapter]] = {}
#: What `get_adapter` asks when no hand-written adapter exists: `hf_prune.derivation` registers its verified
#: derivation here when the package is imported (a hook, so this module never imports the derivation, which
#: builds and cuts models; the loader format's bundled remote code has no fallback and refuses such types).
_FALLBACKS: list[Callable[[PretrainedConfig], ArchitectureAdapter]] = []


def register_fallback(derive: Callable[[PretrainedConfig], ArchitectureAdapter]) -> None:
    """Make `derive(config)` the adapter of every config whose `model_type` has no hand-written adapter."""
    if derive not in _FALLBACKS:
        _FALLBACKS.append(derive)


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    """Class decorator: make `cls` the adapter for each of its `model_types`."""
    for model_type in cls.model_types:
        if model_type in _ADAPTERS:
            raise ValueError(f"model_type {model_type!r} already has adapter {_ADAPTERS[model_type].__name__}")
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(config: PretrainedConfig | str) -> ArchitectureAdapter:
    """The adapter for a config (or a `model_type` string); a typed error names the supported ones.

    A hand-written adapter is preferred; a config without one gets an adapter derived from a tiny
    instance of its config class and verified on it (`hf_prune.derivation`), or a `DerivedAdapterError` saying
    what could not be resolved."""
    model_type = config if isinstance(config, str) else config.model_type
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]()
    if isinstance(config, PretrainedConfig) and _FALLBACKS:
        return _FALLBACKS[-1](config)
    try:
        return _ADAPTERS[model_type]()
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no architecture adapter. Supported: {', '.join(supported_model_types())}. "
            "Add one file in hf_prune/groups/ (see llama.py) to support it."
        ) from None
