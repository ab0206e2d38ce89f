"""Low-memory (sequential) pruning: only one layer's weights are in memory at a time.

The model is built on the meta device. The calibration inputs of every layer are captured
(`layer_inputs`) with only the tensors outside the layer stack loaded (embeddings; rotary embeddings and masks
are computed as usual; what runs between layers, such as ConvNeXt's downsampling before a stage, is
loaded again for a moment before the layer it feeds). Then each layer in turn is read from the
safetensors shards, measured with the same hooks as the whole-model pass
(`statistics.register_layer_hooks`), scored and planned (`allocation.plan_layer`), repaired
(`reconstruction.reconstruct`), cut (`surgery.cut_layer`), written to a staging folder (under the
name it takes in the pruned model: `ArchitectureAdapter.kept_layer_names`) and unloaded; its
calibration outputs are the next layer's inputs.

The loop is `hf_prune.engine.core.prune_layers`, shared with the in-memory layer-by-layer prune;
this module is its source of weights (`ShardSource`). Propagating through the *unpruned* layer
(`PruningConfig(propagate="unpruned")`, the default) gives every layer exactly the inputs of the
whole-model calibration pass, so layer-local criteria reproduce the in-memory prune;
`propagate="pruned"` feeds the next layer what the pruned model will compute instead, and
`propagate="both"` also carries the dense stream as the target of each changed layer's refit, as
the in-memory `layerwise` prune does (with the same result). Layer and branch removal rank blocks
across layers: a first pass scores them, the second prunes.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import shutil
import tempfile
import weakref
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)

from ..allocation import plan_for
from ..calibration.layer_inputs import LayerInputs, capture_layer_inputs
from ..calibration.sources import token_windows
from ..calibration.statistics import batch_tokens
from ..config import PruningConfig
from ..criteria.random import RandomCriterion
from ..errors import LowMemoryError, NotPrunedError
from ..finite import check_finite_weights
from ..output.atomic import write_atomically
from ..output.checkpoint import decide_format, meta_copy
from ..plan import LayerPlan, PruningPlan
from ..pruner import HFPruner, load_preprocessor
from ..report import PruningReport
from ..surgery import cut_layer, drop_layers
from .core import (
    LayerSource,
    calibration_summary,
    check_layer_local,
    check_untied_heads,
    detach_shared_config,
    layer_batches,
    model_class_for,
    prune_by_layer,
    statistics_requirements,
)

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc (macOS, Windows, musl)
    _LIBC = None

INDEX_FILE = "model.safetensors.index.json"


class CheckpointShards:
    """Where each tensor of a safetensors checkpoint lives (one file, or shards and their index; or, with
    `every_file=True`, every `*.safetensors` file of the folder, as the low-memory pruner stages them)."""

    def __init__(self, folder: Path, every_file: bool = False):
        self.folder = folder
        index, single = folder / INDEX_FILE, folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif single.is_file() or every_file:
            self.files = {}
            for file in [single] if single.is_file() else sorted(folder.glob("*.safetensors")):
                with safe_open(file, "pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
        else:
            raise LowMemoryError(
                f"low_memory=True reads safetensors weights, and {folder} has neither {INDEX_FILE} nor "
                "model.safetensors. Re-save the model with save_pretrained (safetensors is its default) or "
                "load it without low_memory."
            )

    def load(self, names: Iterable[str], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The named tensors, read from their shards straight onto `device`."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, "pt", device=str(device)) as handle:
                for name in file_names:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return tensors

    def empty(self, name: str) -> torch.Tensor:
        """A meta tensor of the named tensor's shape and dtype (nothing is read)."""
        with safe_open(self.files[name], "pt") as handle:
            piece = handle.get_slice(name)
            dtype = _DTYPES[piece.get_dtype()]
            return torch.empty(piece.get_shape(), dtype=dtype, device="meta")


@dataclass
class ConvertedTensors:
    """Checkpoint tensors that `from_pretrained` converts together into model tensors, as one of transformers'
    `WeightConverter`s says: a mixture of experts' per-expert `experts.{e}.w1.weight` stacked into the fused
    `experts.gate_up_proj` (Mixtral, Qwen2-MoE, ...), a fused `qkv` chunked into `q`, `k`, `v`. The converter
    itself runs, on the checkpoint keys in the natural order `from_pretrained` sorts them in."""

    converter: WeightConverter
    #: the converter's first target (the key `from_pretrained` collects the sources under)
    target: str
    #: (checkpoint key, the converter's source pattern it matched)
    sources: list[tuple[str, str]] = field(default_factory=list)

    def convert(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Model name → tensor, from the sources' tensors (checkpoint key → tensor)."""
        converter = copy.deepcopy(self.converter)
        for key, pattern in sorted(self.sources, key=lambda source: dot_natural_key(source[0])):
            converter.add_tensor(self.target, key, pattern, tensors[key])
        converted = converter.convert(self.target, model=model, config=model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in converted.items()}


def _checkpoint_names(model: PreTrainedModel, shards: CheckpointShards) -> dict[str, str | ConvertedTensors]:
    """Model state-dict name → checkpoint name (or the converted group it comes from), for every tensor the
    checkpoint holds.

    Names go through the renames `from_pretrained` applies (legacy layouts such as GPT-NeoX's
    `embed_out` or ViT's `encoder.layer.N.attention.attention.query`, and the base-model prefix).
    Tensors that `from_pretrained` converts (per-expert weights merged into fused 3-D expert tensors, a fused
    projection split) map to their `ConvertedTensors`; which model names a group gives is found by running its
    converter on meta tensors of the checkpoint's shapes. A missing layer tensor is reported by
    `LowMemoryPruner.prune`. The transforms that matched are kept on the model (`_weight_conversions`, as
    `from_pretrained` keeps them), so that saving writes the checkpoint's own format back.
    """
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    state = model.state_dict()
    names: dict[str, str | ConvertedTensors] = {}
    groups: dict[str, ConvertedTensors] = {}
    for key in shards.files:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if pattern is None and name in state:
            names[name] = key
        elif pattern is not None and name in state:
            group = groups.setdefault(name, ConvertedTensors(by_pattern[pattern], name))
            group.sources.append((key, pattern))
    for group in groups.values():
        produced = group.convert({key: shards.empty(key) for key, _ in group.sources}, model)
        names.update((name, group) for name in produced if name in state)
    model._weight_conversions = [t for t in transforms if t.was_used()]
    return names


def _read(
    model: PreTrainedModel,
    shards: CheckpointShards,
    names: dict[str, str | ConvertedTensors],
    wanted: Iterable[str],
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """The `wanted` model tensors (model name → tensor), read from the shards and converted where
    `from_pretrained` converts them."""
    wanted = list(wanted)
    plain = [name for name in wanted if isinstance(names[name], str)]
    groups = {id(group): group for name in wanted if not isinstance(group := names[name], str)}
    keys = [names[name] for name in plain] + [key for group in groups.values() for key, _ in group.sources]
    loaded = shards.load(keys, device, dtype)
    tensors = {name: loaded[names[name]] for name in plain}
    for group in groups.values():
        tensors.update(group.convert(loaded, model))
    return {name: tensors[name] for name in wanted}


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attribute in module._parameters:
        module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attribute] = tensor


#: glibc `mallopt` parameter: allocations at least this large get their own mapping.
_M_MMAP_THRESHOLD = -3
#: 64 KiB: every tensor of a layer's weights, statistics and activations is mapped on its own.
_MMAP_THRESHOLD_BYTES = 64 * 1024


def _map_large_allocations() -> None:
    """Give every allocation of 64 KiB or more its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold (up to 32 MB) each time a mapped block is freed, so after the
    first layer most of a layer's tensors land in the heap, where freed blocks fragment and the
    resident size creeps up layer after layer. Free heap blocks are still reused, so this is set
    as the low-memory pruner is built, before its first large allocation. Measured on the 1.7B
    synthetic checkpoint (`scripts/benchmark_scale.py`): peak RSS 2.50 GB without, 1.95 GB with.
    Fixing the threshold (which also stops its adjustment) is process-wide and stays set: the
    process asked for low memory. A no-op where glibc is absent."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _give_back_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc's `malloc_trim`): a layer's weights and its
    statistics are freed after each layer, but glibc keeps the pages for reuse, which adds
    fragments of every layer to the peak resident size. A no-op where glibc is absent."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _free(module: nn.Module, names: Iterable[str] | None = None) -> None:
    """Drop weights (all of `module`'s, or the named ones), keeping their (possibly pruned)
    shapes on the meta device."""
    tensors = module.state_dict(keep_vars=True)
    for name in tensors if names is None else names:
        _set_tensor(module, name, torch.empty_like(tensors[name], device="meta"))


class ShardSource(LayerSource):
    """The layer loop's weights read from the checkpoint's shards one layer at a time: a kept layer
    is cut once pruned (and repaired), written to the staging folder under the name it takes in the
    pruned model (`ArchitectureAdapter.kept_layer_names`) and unloaded."""

    def __init__(self, pruner: LowMemoryPruner, staging: Path):
        super().__init__(pruner.model, pruner.adapter)
        self.pruner, self.staging = pruner, staging
        self.present: set[int] = set()
        self.plan_ready(PruningPlan.keep_all(pruner.model, pruner.adapter))

    def plan_ready(self, plan: PruningPlan) -> None:
        """Each kept layer is staged under its index among the kept layers (`kept_layer_names`)."""
        self.kept = plan.kept_layers
        self.kept_names = self.adapter.kept_layer_names(self.model, self.kept)
        self.files = len(self.kept) + 1

    def capture(self, batches: list[torch.Tensor]) -> LayerInputs:
        return self.pruner._capture(batches)

    def load(self, index: int) -> None:
        self.pruner._load(self.pruner._layer_names(index))
        self.present.add(index)

    def loaded(self, index: int) -> bool:
        return index in self.present

    def entering(self, inputs: LayerInputs, index: int, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.pruner._entering(inputs, index, stream)

    def settle(self, index: int, layer: nn.Module, layer_plan: LayerPlan) -> None:
        cut_layer(layer, self.adapter, layer_plan)

    def release(self, index: int, layer: nn.Module, layer_plan: LayerPlan | None) -> None:
        if layer_plan is not None and layer_plan.keep_layer:
            position = self.kept.index(index)
            self.pruner._stage(
                self.staging,
                f"model-{position + 2:05d}-of-{self.files:05d}.safetensors",
                {f"{self.kept_names[position]}.{name}": t for name, t in layer.state_dict().items()},
            )
        _free(layer)
        self.present.discard(index)
        _give_back_freed_memory()

    def outcome(self, index: int, pruned_before: bool, stream: str) -> str:
        return self.pruner._failed_outcome


class LowMemoryPruner(HFPruner, reads_shards=True):
    """`HFPruner.from_pretrained(path, low_memory=True)`: prunes a model larger than memory layer by layer.

    `model` stays on the meta device (with the pruned shapes after `prune`) until `load_model()`;
    the pruned weights wait in a staging folder until `save_pretrained` moves them into place.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        shards: CheckpointShards,
        tokenizer=None,
        processor=None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(model, tokenizer=tokenizer, processor=processor)
        self.shards = shards
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.names = _checkpoint_names(model, shards)
        self.parameter_names = {name for name, _ in model.named_parameters()}
        count = len(self.adapter.layers(model))
        #: the state-dict name prefix of every layer, and of what runs before it outside the stack.
        self.layer_prefixes = [f"{self.adapter.layer_name(model, index)}." for index in range(count)]
        self.entry_prefixes = {
            index: tuple(f"{name}." for name in names) for index, names in self.adapter.layer_entries(model).items()
        }
        #: where the pruned weights are: the staging folder after `prune`, the saved folder after a save.
        self.weights_folder: Path | None = None
        self.staging: Path | None = None

    @classmethod
    def from_checkpoint(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **from_pretrained_kwargs,
    ) -> LowMemoryPruner:
        """Build the model on the meta device from a local folder's config; no weights are read."""
        if "gguf_file" in from_pretrained_kwargs:
            raise LowMemoryError(
                "low_memory=True cannot read gguf_file=...: GGUF tensors are quantized as a whole file. Load it "
                "without low_memory and save_pretrained it once to get safetensors shards, then prune those."
            )
        path = Path(folder)
        if not path.is_dir():
            raise LowMemoryError(
                f"low_memory=True reads a local folder of safetensors shards; {str(folder)!r} is not a folder. "
                "Download it first (huggingface_hub.snapshot_download) and pass the folder."
            )
        unsupported = sorted(set(from_pretrained_kwargs) - {"local_files_only"})
        if unsupported:
            raise LowMemoryError(
                f"low_memory=True does not take {', '.join(unsupported)}; it takes device= and dtype= (and "
                "PruningConfig(propagate=...) in prune)."
            )
        _map_large_allocations()  # before anything of this pruner's lands in the heap
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            model = model_class_for(config, from_gguf=False)(config)
        model.tie_weights()  # tied copies (an LM head tied to the embeddings) are not in the checkpoint
        tokenizer, processor = load_preprocessor(path, {})
        pruner = cls(model.eval(), CheckpointShards(path), tokenizer, processor, device=device, dtype=dtype)
        pruner.card_facts.record_source(folder)
        return pruner

    # ----------------------------------------------------------------- weights in and out
    def _layer_names(self, index: int) -> list[str]:
        return [name for name in self.names if name.startswith(self.layer_prefixes[index])]

    def _load(self, names: list[str]) -> None:
        """Read the named tensors into the model, the weights checked for NaN and Inf as they arrive."""
        tensors = _read(self.model, self.shards, self.names, names, self.device, self.dtype)
        check_finite_weights(
            ((name, tensors[name]) for name in names if name in self.parameter_names),
            f"the checkpoint in {self.shards.folder}",
            self._failed_outcome,
        )
        for name in names:
            _set_tensor(self.model, name, tensors[name])

    #: the end of a `NonFiniteError` raised mid-prune (earlier layers may already be cut on the meta model).
    _failed_outcome = (
        "The checkpoint files are unchanged; load it again (low_memory=True) before retrying, as this pruner may "
        "already have cut the layers before."
    )

    def _outside_layers(self) -> list[str]:
        """State-dict names outside every layer that the checkpoint holds (tied copies are not saved;
        what runs between layers, such as ConvNeXt's downsampling, is outside)."""
        layers = tuple(self.layer_prefixes)
        return [name for name in self.names if not name.startswith(layers)]

    def _entering(self, inputs: LayerInputs, index: int, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        """`stream` through what the model runs before layer `index` outside the stack
        (`LayerInputs.entering`), its weights loaded for the while."""
        if index not in self.entry_prefixes:
            return stream
        names = [name for name in self.names if name.startswith(self.entry_prefixes[index])]
        self._load(names)
        try:
            return inputs.entering(index, stream)
        finally:
            _free(self.model, names)

    def _check_complete(self) -> None:
        """Every parameter (a tied one counts once) must be in the checkpoint, or it would be saved missing."""
        missing = [name for name, _ in self.model.named_parameters() if name not in self.names]
        if missing:
            raise LowMemoryError(
                f"the checkpoint in {self.shards.folder} lacks {len(missing)} tensors the model needs "
                f"(e.g. {missing[0]}); low_memory=True reads checkpoints whose tensors from_pretrained only "
                "renames, never converts."
            )

    def _capture(self, batches: list[torch.Tensor]) -> LayerInputs:
        """Every layer's calibration arguments, with only the tensors outside the layer stack loaded."""
        outside = self._outside_layers()
        self._load(outside)
        try:
            return capture_layer_inputs(self.model, self.adapter, batches, self.device, self.dtype)
        finally:
            _free(self.model, outside)

    def _stage(self, staging: Path, file: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors` (model names) as `save_pretrained` would: in the checkpoint's own format (the
        conversions `from_pretrained` would apply reverted, e.g. fused expert tensors split per expert)."""
        if self.model._weight_conversions:
            tensors = revert_weight_conversion(self.model, tensors)
        save_file(
            {name: tensor.contiguous().cpu() for name, tensor in tensors.items()},
            staging / file,
            metadata={"format": "pt"},
        )

    # ----------------------------------------------------------------- pruning
    def prune(self, config: PruningConfig | None = None, **kwargs) -> PruningReport:
        """Prune layer by layer as `HFPruner.prune` would prune in memory (same config, same plan
        for layer-local criteria), writing the pruned layers to a staging folder."""
        if self.report is not None:
            raise LowMemoryError("this low-memory pruner has already pruned; load the checkpoint again to prune anew.")
        config, targets, criteria = self.validated(config, kwargs)
        if config.allocation != "uniform":
            raise LowMemoryError(
                f"allocation={config.allocation!r} ranks every layer's heads and neurons together, which the "
                "layer-by-layer mode does not do yet; use allocation='uniform' (protected_layers and budgets work) "
                "or load the model without low_memory."
            )
        if targets.stage_channels:
            raise LowMemoryError(
                f"stage_channels={config.stage_channels!r}: a stream channel spans every block of its stage, which "
                "the layer-by-layer mode never holds at once; load the model without low_memory."
            )
        check_layer_local(criteria, "low_memory=True", "load the model without low_memory")
        check_untied_heads(self.adapter, targets, "low_memory=True", "load the model without low_memory")
        self._check_complete()
        self._check_format(self._shape_plan(config), config)
        batches, calibration = [], None
        if statistics_requirements(criteria, config, targets):
            windows = token_windows(
                config.calibration, self.tokenizer, config.num_samples, config.seq_len, config.seed
            )
            batches = layer_batches(windows, config)
            calibration = calibration_summary(config, len(windows), batch_tokens([windows]))

        dense = meta_copy(self.model)  # the shapes before any cut, for the final parameter-count check
        detach_shared_config(self.model)
        staging = Path(tempfile.mkdtemp(prefix="hf_prune-staging-"))
        weakref.finalize(self, shutil.rmtree, staging, True)
        source = ShardSource(self, staging)
        plan = prune_by_layer(source, config, criteria, targets, batches, config.propagate)
        self._stage_outside(staging, source.files)
        report = self._apply(plan, config, calibration, dense, cut=_drop_removed)
        self.weights_folder = self.staging = staging
        return report

    def _shape_plan(self, config: PruningConfig) -> PruningPlan:
        """A plan with the target counts (uniform allocation: the shapes do not depend on which groups go)."""
        return plan_for(self.model, self.adapter, config, RandomCriterion())

    def _stage_outside(self, staging: Path, files: int) -> None:
        names = self._outside_layers()
        tensors = _read(self.model, self.shards, self.names, names, torch.device("cpu"), self.dtype)
        self._stage(staging, f"model-00001-of-{files:05d}.safetensors", tensors)

    # ----------------------------------------------------------------- results
    def load_model(self) -> PreTrainedModel:
        """Fill the meta-device model with the pruned weights (from staging, or from the saved folder)."""
        if self.weights_folder is None:
            raise NotPrunedError("call prune() before load_model(); the low-memory model has no weights until then.")
        shards = CheckpointShards(self.weights_folder, every_file=True)
        names = _checkpoint_names(self.model, shards)  # the staged names are the checkpoint's format
        for name, tensor in _read(self.model, shards, names, names, self.device, None).items():
            _set_tensor(self.model, name, tensor)
        self.model.tie_weights()
        return self.model

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Move the staged shards into `save_directory` with an index, config, tokenizer and model
        card; the folder appears complete or not at all (as `HFPruner.save_pretrained`). A later
        save copies the shards from the folder saved first."""
        if self.report is None:
            raise NotPrunedError("call prune() before save_pretrained(); nothing has been pruned yet.")
        decision = decide_format(self.model, self.adapter)
        source, staged = self.weights_folder, self.weights_folder == self.staging
        transfer = shutil.move if staged else shutil.copy2

        def write(folder: Path) -> None:
            moved = []
            try:
                weight_map, total = {}, 0
                for shard in sorted(source.glob("*.safetensors")):
                    with safe_open(shard, "pt") as handle:
                        for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                            weight_map[name] = shard.name
                            piece = handle.get_slice(name)
                            total += torch.Size(piece.get_shape()).numel() * _itemsize(piece.get_dtype())
                    transfer(shard, folder / shard.name)
                    moved.append(shard.name)
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
                self.model.config.save_pretrained(folder)
                if getattr(self.model, "generation_config", None) is not None and self.model.can_generate():
                    self.model.generation_config.save_pretrained(folder)
                self.write_companions(folder, decision, model_id=Path(save_directory).name)
            except BaseException:
                for name in moved if staged else ():  # the staged weights survive a failed save
                    shutil.move(folder / name, source / name)
                raise

        folder = write_atomically(save_directory, write, overwrite=overwrite)
        self.weights_folder = folder
        self.last_save = (folder, self.report)
        return folder


def _drop_removed(model: nn.Module, adapter, plan: PruningPlan) -> None:
    """The final cut of the low-memory prune: every kept layer is cut already, the removed ones go.
    Tied weights are tied again: loading and freeing the embeddings (`_capture`) replaced the tensor
    a tied head shared, which would count it twice."""
    drop_layers(model, adapter, plan.kept_layers)
    model.tie_weights()


#: safetensors dtype names → torch dtypes.
_DTYPES = {
    "F64": torch.float64,
    "I64": torch.int64,
    "F32": torch.float32,
    "I32": torch.int32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I16": torch.int16,
    "U8": torch.uint8,
    "I8": torch.int8,
    "BOOL": torch.bool,
}


def _itemsize(dtype: str) -> int:
    return _DTYPES[dtype].itemsize
