"""Loading a traced prune: cut the caller's freshly built (unpruned) model as the saved description
says, with the same surgery that made it, then load the safetensors weights. No pickles."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_model
from torch import nn

from ..errors import PrunedCheckpointError
from ..groups import TensorSlice
from ..surgery import slice_tensors

#: The files a traced prune's `save_pretrained` writes, and the description's format name and version.
SHAPES_FILE = "pruned_shapes.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "hf_prune.traced"
FORMAT_VERSION = 1


def load_traced(folder: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Shape `model` (an unpruned instance of the saved architecture) like the saved one and load its weights."""
    folder = Path(folder)
    if not (folder / SHAPES_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise PrunedCheckpointError(
            f"{folder} lacks {SHAPES_FILE} or {WEIGHTS_FILE}; pass the folder a traced prune's save_pretrained wrote."
        )
    description = json.loads((folder / SHAPES_FILE).read_text())
    if description.get("format") != FORMAT or description.get("format_version") != FORMAT_VERSION:
        raise PrunedCheckpointError(
            f"{folder / SHAPES_FILE} is not a version-{FORMAT_VERSION} {FORMAT} description "
            f"(found {description.get('format')!r} version {description.get('format_version')!r})."
        )
    pieces = [TensorSlice(e["tensor"], e["dim"], i, i + 1) for e in description["removed"] for i in e["indices"]]
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted({p.parameter for p in pieces} - set(tensors))
    if missing:
        raise PrunedCheckpointError(
            f"the model passed as model= has no tensors {missing[:3]}...; build the same architecture the prune "
            f"started from ({description.get('model_class')})."
        )
    slice_tensors(model, pieces)
    shapes = {name: list(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    wrong = [name for name, shape in description["shapes"].items() if shapes.get(name) != shape]
    if wrong:
        raise PrunedCheckpointError(
            f"after cutting, {wrong[0]} has shape {shapes.get(wrong[0])}, the saved model "
            f"{description['shapes'][wrong[0]]}; "
            f"model= must be an unpruned {description.get('model_class')} with the original sizes."
        )
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    return model.eval()
