"""Zero-shot pruning of the real SmolLM2-135M: criteria × repairs × budgets, one calibration pass.

Protocol (issue 3): calibration = 128 windows × 512 tokens of WikiText-2 `wiki.valid.tokens`;
evaluation = `wikitext-2-raw/wiki.test.raw` (CRLF → LF), one tokenizer call without BOS, every
non-overlapping 512-token window of the whole test split (589 windows; dense perplexity 30.00), the
field's standard. `--windows N` is the quick mode: the first N windows only (dense, 80 windows: 29.52).
`--split valid` evaluates on the last validation windows instead (`--windows N`: the last N): choose
settings there, never on test (`--damping` sweeps the ridge). `--tasks wikitext2_lastword` adds downstream
tasks to every row, dense included (`hf_prune.evaluation.evaluate_tasks`, lm-evaluation-harness; the offline
`wikitext2_lastword` and `wikitext2_nextsentence`, or any harness task where the Hub is reachable), each on
`--task-limit` examples; the tasks, the limit and the lm-eval version join the resume key.

Resumable: finished rows are kept in the JSON file with every setting that changes the numbers
(results_file.py), skipped on the next run with the same settings; other settings are refused.
`--rows` filters by row name or substring of it and runs rows in that order. Prints the command that
reproduces the table, the settings and the table, and writes JSON (and the printed text as `.txt`).

    python scripts/benchmark_zero_shot.py --rows mlp50 --output outputs/zero_shot.json
    python scripts/benchmark_zero_shot.py --model tiny --rows mlp25/magnitude --windows 2   # plumbing only
    python scripts/benchmark_zero_shot.py --rows mlp25/obs+lstsq --windows 80 --tasks wikitext2_lastword \
        --task-limit 200 --output outputs/zero_shot_tasks.json
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import torch
from results_file import LANGUAGE_MODELS, PACKAGES, language_model, open_results, package_versions

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.data import data_file, wikitext2_test_text
from hf_prune.calibration.sources import token_windows
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.criteria import get_criterion
from hf_prune.evaluation import evaluate_tasks, parameter_count, perplexity

BUDGETS = {
    "mlp25": {"mlp_neurons": 0.25},
    "mlp50": {"mlp_neurons": 0.5},
    "kv1of3": {"kv_groups": 1},
    "layers4": {"layers": 4},
    "sparsity20": {"sparsity": 0.2},
}
#: Tokens per evaluation window.
SEQ_LEN = 512
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
                settings = {
                    **BUDGETS[budget],
                    "criterion": criterion,
                    "reconstruct": "lstsq",
                    "allocation": allocation,
                }
                table[f"{budget}/{criterion}+lstsq/{allocation}"] = settings
    for repair, criteria in REPAIR_CRITERIA.items():
        for criterion in criteria:
            for budget in ("mlp25", "mlp50", "kv1of3"):
                settings = {**BUDGETS[budget], "criterion": criterion, "reconstruct": repair}
                table[f"{budget}/{criterion}+{repair}"] = settings
    for importance in ("magnitude", "taylor"):
        for budget in ("mlp25", "mlp50", "kv1of3"):
            table[f"{budget}/torch-pruning-{importance}"] = {**BUDGETS[budget], "torch_pruning": importance}
    return table


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluation_ids(tokenizer, split: str, windows: int | None) -> tuple[torch.Tensor, int]:
    """The evaluation tokens, whole `SEQ_LEN`-token windows only, and how many windows the split has:
    on `test` the first `windows` of the raw test split, on `valid` the last `windows` of
    `wiki.valid.tokens`; `None`: every window."""
    if split == "test":
        text = wikitext2_test_text()
    else:
        text = data_file("wikitext-2/wiki.valid.tokens").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // SEQ_LEN
    count = available if windows is None else min(windows, available)
    return (ids[: count * SEQ_LEN] if split == "test" else ids[ids.numel() - count * SEQ_LEN :]), available


def task_scores(model, tokenizer, setting: dict) -> dict:
    """`{"TASK/METRIC": value}` for the `--tasks` of `setting` (empty without them)."""
    if not setting.get("tasks"):
        return {}
    scores = evaluate_tasks(model, tokenizer, setting["tasks"], limit=setting["task_limit"])
    return {"tasks": {f"{score.task}/{score.metric}": score.value for score in scores}}


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
        **task_scores(pruner.model, base.tokenizer, setting),
    }


def torch_pruning_row(base: HFPruner, row: dict, setting: dict, ids: torch.Tensor, dense: dict) -> dict:
    """The same budget with Torch-Pruning (its MetaPruner, magnitude or Taylor importance); a failure
    is recorded in the row, with the error and the seconds it took."""
    # The optional `bench` extra: imported here so hf_prune rows run without it.
    from torch_pruning_baseline import prune_with_torch_pruning

    config = PruningConfig(num_samples=setting["num_samples"])
    windows = token_windows(config.calibration, base.tokenizer, config.num_samples, config.seq_len, config.seed)
    model = copy.deepcopy(base.model)
    row = {**row, "torch_pruning_version": package_versions(("torch-pruning",))["torch-pruning"]}
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
        **task_scores(model, base.tokenizer, setting),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=LANGUAGE_MODELS, default="smollm2", help="tiny: random weights, plumbing")
    parser.add_argument("--rows", default="", help="comma-separated row names or substrings of them (default: all)")
    parser.add_argument("--output", default="outputs/benchmark_zero_shot.json")
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument(
        "--windows",
        "--eval-windows",
        type=int,
        default=None,
        help=f"evaluate the first N {SEQ_LEN}-token windows only (valid: the last N); default: the whole split",
    )
    parser.add_argument("--num-samples", type=int, default=PruningConfig.num_samples, help="calibration windows")
    parser.add_argument(
        "--damping", type=float, default=PruningConfig.damping, help="PruningConfig.damping, every row"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--tasks", default="", help="comma-separated tasks for every row (evaluate_tasks), e.g. wikitext2_lastword"
    )
    parser.add_argument("--task-limit", type=int, default=None, help="examples per task (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    table = rows()
    parts = args.rows.split(",") if args.rows else [""]
    # Rows run in the order `--rows` names them, so the most wanted finish first.
    # A whole row name selects that row only; any other part, every row containing it.
    wanted = list(
        dict.fromkeys(name for part in parts for name in table if name == part or part not in table and part in name)
    )

    base = language_model(args.model)
    ids, available = evaluation_ids(base.tokenizer, args.split, args.windows)
    calibration = PruningConfig(num_samples=args.num_samples)
    setting = {
        "model": args.model,
        "split": args.split,
        "windows": ids.numel() // SEQ_LEN,  # evaluated, whatever --windows asked
        "seq_len": SEQ_LEN,
        "calibration": f"{calibration.calibration} valid, seed {calibration.seed}, seq_len {calibration.seq_len}",
        "num_samples": args.num_samples,
        "damping": args.damping,
        "threads": args.threads,
    }
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if tasks:  # only then: files written without tasks resume as before
        setting |= {"tasks": tasks, "task_limit": args.task_limit}
    packages = (*PACKAGES, "lm-eval") if tasks else PACKAGES
    results = open_results(args.output, setting, __file__, argv, parser, packages)
    todo = [name for name in wanted if name not in results]
    if "dense" not in results:
        dense = {"perplexity": perplexity(base.model, ids), "parameters": parameter_count(base.model)}
        results.save_row("dense", {**dense, **task_scores(base.model, base.tokenizer, setting)})

    def needs_statistics(name: str) -> bool:
        row = table[name]
        if "torch_pruning" in row or row.get("propagate", "unpruned") != "unpruned":  # measured layer by layer
            return False
        return row["reconstruct"] != "none" or bool(get_criterion(row["criterion"]).requires)

    statistics = None
    for name in todo:
        if needs_statistics(name) and statistics is None:  # one pass, when the first row needs it
            windows = token_windows(
                calibration.calibration, base.tokenizer, args.num_samples, calibration.seq_len, calibration.seed
            )
            start = time.perf_counter()
            requirements = {"moments", "mlp_gram", "influence"}
            if any(table[other].get("criterion") in ("taylor", "fisher") for other in todo):
                requirements.add("gradients")
            batches = windows.split(4 if "gradients" in requirements else 8)
            statistics = collect_statistics(base.model, base.adapter, batches, requirements)
            results.info["calibration_seconds"] = time.perf_counter() - start
        dense = results.rows["dense"]
        if "torch_pruning" in table[name]:
            row = torch_pruning_row(base, table[name], setting, ids, dense)
        else:
            statistics_for_row = statistics if needs_statistics(name) else None
            row = hf_prune_row(base, table[name], setting, statistics_for_row, ids, dense)
        results.save_row(name, row)
        if "error" in row:
            print(f"{name:32} failed after {row['seconds']:.1f} s: {row['error']}", flush=True)
        else:
            seconds = row["prune_seconds_without_calibration"]
            print(f"{name:32} ppl {row['perplexity']:12.2f}  ×{row['ratio']:8.3f}  {seconds:6.1f} s", flush=True)

    results.report(table_text(results.rows, wanted, setting, available))
    return results.rows


def table_text(results: dict, wanted: list[str], setting: dict, available: int) -> str:
    """The rows `wanted` (in that order) of `results`, below a line that names the evaluation."""
    windows = setting["windows"]
    if windows == available:
        scope = f"the whole split, {windows} windows"
    else:
        scope = f"the {'first' if setting['split'] == 'test' else 'last'} {windows} of {available} windows"
    # One column per task: its accuracy (the first metric when it has none).
    columns = {}
    for key in results["dense"].get("tasks", {}):
        task, metric = key.split("/", 1)
        if task not in columns or metric == "acc":
            columns[task] = key
    task_header = "".join(f" {task:>{max(len(task), 8)}}" for task in columns)
    lines = [
        f"{setting['model']}, WikiText-2 {setting['split']}, {scope} of {SEQ_LEN} tokens; "
        f"dense perplexity {results['dense']['perplexity']:.2f}",
        f"{'row':32} {'params':>12} {'perplexity':>12} {'× dense':>9} {'prune s':>8} {'peak MB':>8}{task_header}",
    ]
    if columns:
        limit = setting.get("task_limit")
        lines.insert(1, f"tasks: {', '.join(columns.values())}, {f'first {limit}' if limit else 'all'} examples")
    names = ["dense"] if columns else []
    for name in names + [name for name in wanted if name != "dense"]:
        row = results.get(name)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"{name:32} failed: {row['error']}")
            continue
        cells = "".join(
            f" {row.get('tasks', {}).get(key, float('nan')):>{max(len(t), 8)}.4f}" for t, key in columns.items()
        )
        if name == "dense":
            lines.append(
                f"{name:32} {row['parameters']:>12,} {row['perplexity']:>12.2f} {1:>9.3f} {'':>8} {'':>8}{cells}"
            )
        else:
            lines.append(
                f"{name:32} {row['parameters']:>12,} {row['perplexity']:>12.2f} {row['ratio']:>9.3f} "
                f"{row['prune_seconds_without_calibration']:>8.1f} {row['peak_rss_mb']:>8.0f}{cells}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
