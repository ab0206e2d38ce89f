"""The model card `save_pretrained` writes: README.md (from `model_cards/pruned_model_card.md`, through
`huggingface_hub.ModelCard`), the per-layer plot and the recipe that reproduces the prune.

Only what was measured is stated: quality and latency appear when a `Measurement` was recorded,
otherwise the card says "not measured". The metadata holds `base_model` (when the source is a Hub
repo), the base model's license (when its card says), tags, the evaluation data sets, every measured
number of the pruned model as a `model-index` evaluation result (none when nothing was measured), and no
`base_model_relation`: the Hub accepts only adapter, merge, quantized and finetune there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ..errors import PrunedCheckpointError
from ..evaluation import FLOPS_CONTEXT, flops_per_token, parameter_count
from ..kinds import __version__
from ..report import PruningReport
from .atomic import write_file_atomically
from .plots import PLOT_FILE, plot_kept_structure
from .recipes import recipe_yaml
from .remote_code import auto_classes

TEMPLATE_FILE = "pruned_model_card.md"
RECIPE_FILE = "hf_prune_recipe.yaml"
#: What the card's snippet names when the source is unknown (a model pruned in memory).
SOURCE_PLACEHOLDER = "BASE_MODEL"
TAGS = ["pruned", "structured-pruning", "hf_prune"]
_PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForImageClassification": "image-classification",
    "AutoModel": "feature-extraction",
}


def template_path() -> Path:
    """Wheels carry the templates inside the package (pyproject maps the repository's `model_cards/`
    to `hf_prune/model_cards/`); a source checkout or editable install reads `model_cards/` itself."""
    package = Path(__file__).resolve().parents[1]  # hf_prune/
    for folder in (package / "model_cards", package.parent / "model_cards"):
        if (folder / TEMPLATE_FILE).is_file():
            return folder / TEMPLATE_FILE
    raise FileNotFoundError(
        f"{TEMPLATE_FILE} is neither in {package / 'model_cards'} nor in {package.parent / 'model_cards'}"
    )


@dataclass(frozen=True)
class Measurement:
    """One number measured on the model before and after pruning, with how it was measured.

    The card's tables show both numbers; its metadata's `model-index` holds the pruned model's (`after`)
    as a self-reported `huggingface_hub.EvalResult` (`eval_result`), since the card describes that model.
    """

    metric: str
    before: float
    after: float
    protocol: str
    kind: Literal["quality", "speed"] = "quality"
    dataset: str | None = None  # Hub id of the evaluation data: the metadata's `datasets`, the model-index type
    dataset_name: str | None = None  # model-index dataset name (default: `dataset`, else "custom")
    dataset_config: str | None = None  # the `datasets` config name, e.g. "wikitext-2-raw-v1"
    split: str | None = None  # e.g. "test"
    metric_type: str | None = None  # model-index metric id, e.g. "perplexity" (default: `metric` as a slug)

    def eval_result(self, task_type: str) -> EvalResult:
        """The `after` value as a `model-index` entry. Data that is not a Hub data set (the random inputs
        latency runs on) has the dataset type "custom"; the metric's name carries the protocol, since a
        model-index `source` needs a URL and the protocol has none. `verified=False`: self-reported."""
        return EvalResult(
            task_type=task_type,
            dataset_type=self.dataset or "custom",
            dataset_name=self.dataset_name or self.dataset or "custom",
            dataset_config=self.dataset_config,
            dataset_split=self.split,
            metric_type=self.metric_type or re.sub(r"[^a-z0-9]+", "_", self.metric.lower()).strip("_"),
            metric_value=self.after,
            metric_name=f"{self.metric}: {self.protocol}",
            verified=False,
        )


@dataclass(frozen=True)
class TrainingFacts:
    """How a model was pruned during fine-tuning (`PruningCallback`), for the card's "Pruned during
    fine-tuning" section and its reproduce snippet. `None` fields were not known, for example when
    `finalize()` ran outside a `Trainer`."""

    score: str
    score_description: str  # what the score measures, with its source paper
    schedule: dict  # the resolved `PruningSchedule.to_dict()`
    callback_arguments: str  # the `PruningCallback` keywords beyond config and schedule, as Python source
    steps: int | None = None  # optimizer steps trained
    max_steps: int | None = None
    epoch: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None  # training samples per optimizer step, all processes together
    merged_adapters: bool = False  # PEFT adapters merged into the weights before the cut
    best_checkpoint: str | None = None  # the checkpoint cut instead of the last step (`load_best_model_at_end`)
    distillation: str | None = None  # the distillation loss and teacher, when the callback distilled

    def describe(self) -> list[str]:
        """The section's bullet points (Markdown)."""
        schedule = self.schedule
        start, end = schedule["start_step"], schedule["end_step"]
        if schedule["kind"] == "oneshot":
            lines = [f"**Schedule:** `oneshot`, every target at once after step {start}"]
        else:
            every = "every step" if schedule["frequency"] == 1 else f"every {schedule['frequency']} steps"
            lines = [
                f"**Schedule:** `{schedule['kind']}` from step {start} to step {end}, {every}, starting at "
                f"{schedule['initial_sparsity']:.0%} of the targets"
            ]
        run = []
        if self.steps is not None:
            run.append(
                f"{self.steps} of {self.max_steps} optimizer steps" if self.max_steps else f"{self.steps} steps"
            )
        if self.epoch is not None:
            run.append(f"{self.epoch:g} epochs")
        if self.learning_rate is not None:
            run.append(f"learning rate {self.learning_rate:g}")
        if self.batch_size is not None:
            run.append(f"{self.batch_size} samples per optimizer step")
        if run:
            lines.append(f"**Fine-tuning:** {', '.join(run)}")
        if self.steps is not None and self.steps < end:
            lines.append(
                f"**Targets not reached:** training stopped at step {self.steps}, before the schedule's end "
                f"(step {end}); the tables show what was cut"
            )
        if self.best_checkpoint:
            lines.append(f"**Cut from:** the best checkpoint, `{self.best_checkpoint}`, with the masks it saved")
        if self.distillation:
            lines.append(f"**Distillation:** {self.distillation}")
        if self.merged_adapters:
            lines.append("**Adapters:** the PEFT (LoRA) adapters were merged into the weights before the cut")
        return lines

    def snippet(self, recipe_file: str) -> str:
        """Python that runs the same callback (the model, data and training arguments are the user's)."""
        schedule = ", ".join(f"{key}={json.dumps(value)}" for key, value in self.schedule.items())
        gates = "callback.attach_gates(model)  # before Trainer(...), which builds the optimizer\n"
        distillation = "Distillation, " if self.distillation else ""
        return (
            "from transformers import Trainer\n\n"
            f"from hf_prune import {distillation}PruningCallback, PruningConfig, PruningSchedule\n\n"
            "callback = PruningCallback(\n"
            f'    PruningConfig.from_yaml("{recipe_file}"),\n'
            f"    PruningSchedule({schedule}),\n"
            f"    {self.callback_arguments},\n"
            ")\n"
            f"{gates if self.score == 'l0' else ''}"
            "trainer = Trainer(model=model, args=args, train_dataset=train_data, callbacks=[callback])"
            f"{f'  # max_steps={self.max_steps}' if self.max_steps else ''}\n"
            "trainer.train()  # the pruned model is saved to args.output_dir/pruned"
        )


@dataclass
class CardFacts:
    """What the card says beyond the pruning report: the model before pruning, where it came
    from, what was measured, and the command that made it."""

    dense_parameters: int
    dense_flops: int
    source: str | None = None  # what the model was loaded from
    base_model: str | None = None  # Hub repo id
    base_license: str | None = None
    command: str | None = None
    measurements: list[Measurement] = field(default_factory=list)
    source_weights: str | None = None  # what the weights were before loading, when not plain float tensors
    training: TrainingFacts | None = None  # set when the prune happened during fine-tuning

    def record_gguf_source(self, gguf_path: str | os.PathLike) -> None:
        """A GGUF checkpoint loads dequantized to float, but it carries the rounding error of its
        quantized tensors: the card says which GGUF tensor types the weights came from."""
        import gguf  # read only when the source is a GGUF file

        counts: dict[str, int] = {}
        for tensor in gguf.GGUFReader(gguf_path).tensors:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
        total = sum(counts.values())
        types = ", ".join(
            f"{name} {100 * n / total:.1f}%" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])
        )
        self.source_weights = (
            f"dequantized to float from the GGUF file `{Path(gguf_path).name}` (tensor types by share of the "
            f"weights: {types}); the pruned model is stored in float, with the source's quantization error"
        )

    def record_source(self, name_or_path: str | os.PathLike) -> None:
        """A Hub id becomes `base_model`; the license comes from the base model's own card when it
        can be read (a local folder's README.md, or the Hub card: offline it stays unknown)."""
        self.source = str(name_or_path)
        local = Path(name_or_path)
        if local.is_dir():
            card_location = local / "README.md"
            if not card_location.is_file():
                return
        else:
            self.base_model = card_location = str(name_or_path)
        try:
            card = ModelCard.load(card_location)
        except (OSError, ValueError):  # offline, gated, no card, unreadable metadata: the license stays unknown
            return
        self.base_license = card.data.license or self.base_license


@dataclass(frozen=True)
class CardInputs:
    """Everything the card is rendered from, as plain data: the report, the facts, and what the card
    reads of the pruned model (its architecture, the auto class that loads it, its size)."""

    report: PruningReport
    facts: CardFacts
    model_id: str  # what the load snippets name
    architecture: str
    auto_class: str
    parameters: int
    flops: int  # per token, `flops_per_token`

    @classmethod
    def of(cls, model: nn.Module, report: PruningReport, facts: CardFacts, model_id: str) -> CardInputs:
        """The inputs for a pruned model in memory (weights may be on the meta device)."""
        config = model.config
        architecture = (config.architectures or [type(model).__name__])[0]
        return cls(
            report=report,
            facts=facts,
            model_id=model_id,
            architecture=architecture,
            auto_class=auto_classes(type(config), architecture)[-1],
            parameters=parameter_count(model),
            flops=flops_per_token(model),
        )


def _pair(before: int, after: int) -> str:
    return f"{before} → {after}" if before != after else str(after)


def relative_change(before: float, after: float) -> str:
    """`-19.7%`, or `×69,352` once a number grows more than tenfold (a percentage would hide it)."""
    if not before:
        return "–"
    return f"×{after / before:,.0f}" if after / before > 10 else f"{(after - before) / before:+.1%}"


def _change_row(name: str, before: float, after: float, number: str) -> list[str]:
    return [name, format(before, number), format(after, number), relative_change(before, after)]


def _table(report: PruningReport) -> tuple[list[str], list[list[str]]]:
    """Per-layer columns (KV heads only where they differ from query heads) and rows."""
    gqa = any(layer.kv_heads != layer.heads for layer in report.layers)
    moe = any(layer.experts[0] for layer in report.layers)  # mixture of experts: routed experts per layer
    columns = ["attention heads", "KV heads", "MLP neurons"] if gqa else ["attention heads", "MLP neurons"]
    columns += ["routed experts"] if moe else []
    rows = []
    for layer in report.layers:
        cells = [layer.heads, layer.kv_heads, layer.neurons] if gqa else [layer.heads, layer.neurons]
        cells += [layer.experts] if moe else []
        values = ["–"] * len(cells) if layer.removed else [_pair(*cell) for cell in cells]
        rows.append([str(layer.layer), *values, layer.describe()])
    return columns, rows


def _removed_kinds(report: PruningReport) -> str:
    kept = [layer for layer in report.layers if not layer.removed]
    kinds = {
        "attention heads": any(
            layer.heads[0] != layer.heads[1] and "attention" not in layer.removed_branches for layer in kept
        ),
        "MLP neurons": any(
            layer.neurons[0] != layer.neurons[1] and "mlp" not in layer.removed_branches for layer in kept
        ),
        "routed experts": any(layer.experts[0] != layer.experts[1] for layer in kept),
        "attention branches": any("attention" in layer.removed_branches for layer in kept),
        "MLP branches": any("mlp" in layer.removed_branches for layer in kept),
        "whole layers": len(kept) < len(report.layers),
    }
    return ", ".join(kind for kind, present in kinds.items() if present)


def render_model_card(inputs: CardInputs) -> ModelCard:
    """The card of a pruned model, from plain data (`CardInputs.of(model, report, facts, model_id)`)."""

    facts, report, auto_class = inputs.facts, inputs.report, inputs.auto_class
    quality = [m for m in facts.measurements if m.kind == "quality"]
    speed = [m for m in facts.measurements if m.kind == "speed"]
    card_data = ModelCardData(
        base_model=facts.base_model,
        license=facts.base_license,
        library_name="transformers",
        pipeline_tag=_PIPELINE_TAGS[auto_class],
        tags=list(TAGS),
        datasets=sorted({m.dataset for m in facts.measurements if m.dataset}) or None,
        eval_results=[m.eval_result(_PIPELINE_TAGS[auto_class]) for m in facts.measurements] or None,
        model_name=inputs.model_id if facts.measurements else None,
    )
    base_name = facts.base_model or (Path(facts.source).name if facts.source else report.model_type)
    base_link = f"[{base_name}](https://huggingface.co/{base_name})" if facts.base_model else f"`{base_name}`"
    parameters = inputs.parameters
    columns, rows = _table(report)
    training = facts.training
    criterion = f"`{report.config['criterion']}`"
    if training is not None:
        criterion = f"`{training.score}` during fine-tuning ({training.score_description})"
    when = " during fine-tuning" if training is not None else ""
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=f"{base_name}, pruned{when} with hf_prune",
        summary=(
            f"{base_link} with {100 * (1 - parameters / facts.dense_parameters):.1f}% of its parameters removed by "
            f"structured pruning{when} ({_removed_kinds(report)}), made with hf_prune. The removed heads, neurons "
            "and layers are cut out of the weight matrices, so the model is smaller and faster on any runtime."
        ),
        vanilla=report.output_format == "vanilla",
        output_format=report.output_format,
        format_reason=report.format_reason,
        auto_class=auto_class,
        architecture=inputs.architecture,
        model_id=inputs.model_id,
        plot_file=PLOT_FILE,
        table_columns=columns,
        table_rows=rows,
        config=report.config,
        criterion=criterion,
        training_lines=training.describe() if training is not None else [],
        training_snippet=training.snippet(RECIPE_FILE) if training is not None else None,
        repair=report.config.get("reconstruct", "none") if report.calibration else "none",
        calibration=", ".join(f"{k}={v}" for k, v in (report.calibration or {}).items())
        or "none (no calibration step ran)",
        size_rows=[
            _change_row("parameters", facts.dense_parameters, parameters, ","),
            _change_row("FLOPs per token", facts.dense_flops, inputs.flops, ","),
            *(_change_row(m.metric, m.before, m.after, ",.2f") for m in speed),
        ],
        flops_context=FLOPS_CONTEXT,
        speed_protocols=[f"{m.metric}: {m.protocol}" for m in speed],
        quality_rows=[_change_row(m.metric, m.before, m.after, ",.2f") for m in quality],
        quality_protocols=[f"{m.metric}: {m.protocol}" for m in quality],
        command=facts.command,
        source=facts.source or SOURCE_PLACEHOLDER,
        source_weights=facts.source_weights,
        recipe_file=RECIPE_FILE,
        recipe=recipe_yaml(report.config),
        versions={"hf_prune": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
    )


def write_model_card(folder: Path, inputs: CardInputs) -> None:
    """README.md, the plot it links and the recipe it quotes, into `folder`."""
    plot_kept_structure(inputs.report, folder / PLOT_FILE)
    (folder / RECIPE_FILE).write_text(recipe_yaml(inputs.report.config))
    render_model_card(inputs).save(folder / "README.md")


def recorded_source(folder: str | os.PathLike) -> str | None:
    """The model a saved folder was pruned from, as its card records it: the metadata's `base_model` (a Hub
    repo), else the `--model` of the `hf-prune prune` command in "Reproduce", else the path in its
    `HFPruner.from_pretrained("...")` snippet; `None` when the card names none (no README.md, a model
    pruned in memory, or a card written by the `PruningCallback`, whose snippet names no model)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    try:
        card = ModelCard.load(readme)
    except (OSError, ValueError):
        return None
    base = card.data.base_model
    if base:
        return base if isinstance(base, str) else base[0]
    command = re.search(r"^hf-prune prune (.+)$", card.text, re.MULTILINE)
    if command:
        words = shlex.split(command.group(1))
        for index, word in enumerate(words):
            if word == "--model" and index + 1 < len(words):
                return words[index + 1]
            if word.startswith("--model="):
                return word.split("=", 1)[1]
    snippet = re.search(r'HFPruner\.from_pretrained\("([^"]+)"\)', card.text)
    if snippet and snippet.group(1) != SOURCE_PLACEHOLDER:
        return snippet.group(1)
    return None


# --------------------------------------------------------------------------- `hf-prune eval --write-card`
EVAL_SECTION_BEGIN = "<!-- hf-prune eval: begin -->"
EVAL_SECTION_END = "<!-- hf-prune eval: end -->"


def _result_key(result: EvalResult) -> tuple:
    return (result.dataset_type, result.dataset_name, result.dataset_config, result.dataset_split, result.metric_type)


def _eval_section(measurements: list[Measurement], command: str | None) -> str:
    rows = [_change_row(m.metric, m.before, m.after, ",.4f") for m in measurements]
    lines = [
        EVAL_SECTION_BEGIN,
        "## Evaluation with `hf-prune eval`",
        "",
        *([f"`{command}`", ""] if command else []),
        "| metric | dense | pruned | change |",
        "|---|---:|---:|---:|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        *(f"- {m.metric}: {m.protocol}" for m in measurements),
        EVAL_SECTION_END,
    ]
    return "\n".join(lines)


def add_eval_results(
    folder: str | os.PathLike, measurements: list[Measurement], task_type: str = "text-generation", command=None
) -> Path:
    """Put `measurements` into the folder's card: each as a `model-index` result (replacing an earlier result
    for the same data set, split and metric, keeping every other one) and as a table in the card's
    "Evaluation with `hf-prune eval`" section (replaced when present, else appended). The rest of the card
    is kept; README.md is rewritten atomically."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        raise PrunedCheckpointError(
            f"{folder} has no README.md model card to write the results into; drop --write-card, or re-save the "
            "folder with hf_prune to write one."
        )
    card = ModelCard.load(readme)
    new = [m.eval_result(task_type) for m in measurements]
    keys = {_result_key(result) for result in new}
    card.data.eval_results = [r for r in card.data.eval_results or [] if _result_key(r) not in keys] + new
    card.data.model_name = card.data.model_name or Path(folder).resolve().name
    datasets = {*(card.data.datasets or []), *(m.dataset for m in measurements if m.dataset)}
    card.data.datasets = sorted(datasets) or None
    section = _eval_section(measurements, command)
    text = card.text
    if EVAL_SECTION_BEGIN in text and EVAL_SECTION_END in text:
        before, rest = text.split(EVAL_SECTION_BEGIN, 1)
        text = before + section + rest.split(EVAL_SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    card.text = text
    return write_file_atomically(readme, str(card))
