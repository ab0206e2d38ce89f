"""`HFPruner`: load a transformers model, plan a prune, cut it, save a standard checkpoint."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import transformers
from accelerate import init_empty_weights
from huggingface_hub import HfApi
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .allocation import build_plan
from .checkpoint import decide_format, meta_copy, write_atomically, write_loader_config
from .evaluation import flops_per_token, parameter_count
from .config import PruningConfig
from .criteria import get_criterion
from .errors import InvalidPruningTargetError, NotPrunedError, VanillaFormatError
from .groups import get_adapter
from .model_card import CardFacts, write_model_card
from .plan import PruningPlan
from .report import PruningReport
from .surgery import apply_plan

logger = logging.getLogger(__name__)

# Keywords of `from_pretrained` that also apply to the config and the tokenizer.
_SHARED_KWARGS = ("gguf_file", "revision", "token", "cache_dir", "local_files_only", "subfolder")


def _model_class(config, from_gguf: bool) -> type[PreTrainedModel]:
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is not None:
        return model_class
    return AutoModelForCausalLM if from_gguf else AutoModel


def _without_gguf_marker(model: PreTrainedModel) -> PreTrainedModel:
    """GGUF checkpoints load dequantized to float but flagged as quantized, which makes
    `save_pretrained` refuse; rebuild the model from a clean config with the same tensors."""
    config = model.config
    del config.quantization_config
    with init_empty_weights():
        clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), assign=True)
    clean.tie_weights()
    clean.generation_config = model.generation_config
    return clean.eval()


def _own_config(model: PreTrainedModel) -> None:
    """Give the model a private deep copy of its config before pruning rewrites it, so a config
    object the caller shares with other models is never changed; every module follows."""
    shared, private = model.config, copy.deepcopy(model.config)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = private


class HFPruner:
    """Structural pruning of one transformers model.

    ```python
    pruner = HFPruner.from_pretrained(path)
    report = pruner.prune(kv_groups=1, mlp_neurons=0.25, layers=4)
    pruner.save_pretrained("pruned")
    ```
    """

    def __init__(self, model: PreTrainedModel, tokenizer=None, processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.adapter = get_adapter(model.config)
        self.report: PruningReport | None = None
        self.plan: PruningPlan | None = None
        self.card_facts = CardFacts(parameter_count(model), flops_per_token(model))
        self.last_save: tuple[Path, PruningReport] | None = None  # (folder, the report it holds)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **from_pretrained_kwargs) -> HFPruner:
        """Load a model (and its tokenizer or image processor) as `from_pretrained` would.

        The architecture is checked from the config first, so an unsupported model fails before
        its weights are read. `gguf_file=...` works: the weights are dequantized to float.
        """
        shared = {key: from_pretrained_kwargs[key] for key in _SHARED_KWARGS if key in from_pretrained_kwargs}
        config = AutoConfig.from_pretrained(name_or_path, **shared)
        get_adapter(config)
        from_gguf = "gguf_file" in from_pretrained_kwargs
        model = _model_class(config, from_gguf).from_pretrained(name_or_path, **from_pretrained_kwargs)
        if from_gguf:
            model = _without_gguf_marker(model)
        tokenizer = processor = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **shared)
        except (OSError, ValueError, KeyError):
            try:
                processor = transformers.AutoImageProcessor.from_pretrained(name_or_path, **shared)
            except (OSError, ValueError, KeyError):
                logger.info("No tokenizer or image processor found at %s; saving weights and config only.", name_or_path)
        pruner = cls(model.eval(), tokenizer=tokenizer, processor=processor)
        pruner.card_facts.record_source(name_or_path)
        return pruner

    def prune(self, config: PruningConfig | None = None, **kwargs) -> PruningReport:
        """Score, plan and cut. Pass a `PruningConfig`, or its fields as keywords."""
        if config is not None and kwargs:
            raise TypeError("pass either a PruningConfig or keyword arguments, not both")
        config = config or PruningConfig(**kwargs)
        if config.is_empty:
            raise InvalidPruningTargetError(
                f"nothing to remove: set at least one of {', '.join(PruningConfig.AMOUNTS)} (e.g. mlp_neurons=0.25)."
            )
        criterion = get_criterion(config.criterion, seed=config.seed)
        plan = build_plan(self.model, self.adapter, config, criterion)
        before = parameter_count(self.model)
        expected_after = before - plan.removed_parameter_count(self.model, self.adapter)

        # Decide the output format on a shape-only copy, so a refusal leaves the model untouched.
        shadow = meta_copy(self.model)
        apply_plan(shadow, self.adapter, plan)
        decision = decide_format(shadow, self.adapter)
        if config.require_vanilla and not decision.vanilla:
            raise VanillaFormatError(
                f"require_vanilla=True, but the pruned model needs the loader format: {decision.reason}. "
                "Prune the same number of heads and neurons in every layer, prune only what the family's config "
                "can express, or drop require_vanilla to write the loader format (hf_prune.load_pruned)."
            )

        _own_config(self.model)
        apply_plan(self.model, self.adapter, plan)
        for key, value in decision.config_fields.items():
            setattr(self.model.config, key, value)
        after = parameter_count(self.model)
        if after != expected_after:  # the plan's slices and the surgery disagree: a bug, never silent
            raise RuntimeError(f"surgery left {after:,} parameters, the plan predicts {expected_after:,}")
        self.plan = plan
        self.report = PruningReport.build(
            self.model.config.model_type, plan, before, after, decision.name, decision.reason, config.to_dict()
        )
        return self.report

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write config, safetensors weights, tokenizer or processor, generation config, and the
        model card (README.md, its plot and the recipe).

        The folder appears complete or not at all; an existing non-empty folder is refused
        unless `overwrite=True`.
        """
        if self.report is None:
            raise NotPrunedError("call prune() before save_pretrained(); nothing has been pruned yet.")
        decision = decide_format(self.model, self.adapter)

        def write(folder: Path) -> None:
            self.model.save_pretrained(folder)
            if not decision.vanilla:
                write_loader_config(folder, self.model, self.adapter)
            for extra in (self.tokenizer, self.processor):
                if extra is not None:
                    extra.save_pretrained(folder)
            write_model_card(folder, self, model_id=Path(save_directory).name)

        folder = write_atomically(save_directory, write, overwrite=overwrite)
        self.last_save = (folder, self.report)
        return folder

    def push_to_hub(
        self, repo_id: str, private: bool = False, token: str | None = None, commit_message: str | None = None,
        api: HfApi | None = None,
    ) -> str:
        """Upload the folder `save_pretrained` wrote, in one commit (saved to a temporary folder
        first when this prune was never saved); see `hf_prune.hub.push_folder`."""
        from .hub import push_pruner

        return push_pruner(self, repo_id, private=private, token=token, commit_message=commit_message, api=api)
