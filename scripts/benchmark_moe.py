"""Zero-shot expert pruning of the reference MoE (issue 16): WikiText-2 perplexity per expert criterion.

The model is the folder `scripts/make_reference_moe.py` writes (SmolLM2-135M MoEfied into a Mixtral). Each
row removes `--experts` of every layer's routed experts (a fraction or a count) with one criterion, no
repair (rows `experts/CRITERION+merge`, for the criteria in `--merge`: `expert_repair="merge"`, each removed
expert folded into the kept one it is most often routed with), from one calibration pass shared by every row
(`--num-samples` windows of 512 tokens of the
project's default calibration text, WikiText-2 validation, seed 0). Perplexity: the project's protocol on
the WikiText-2 raw test split, the first `--windows` windows of 512 tokens.

Cost of scoring: the seconds of the calibration pass that collects what the expert criteria read
(`routing` and `expert_norms`; and with `expert_removal`, what `output_error` reads) against the pass that
collects activation moments only (what the dense criteria read) and a plain forward pass over the same
windows (issue goal: ≤ 1.1× the statistics pass), each the fastest of `--timing-repeats` interleaved runs;
`--retime` measures them again into a finished file.

Resumable like the other benchmarks (results_file.py): rows already in `--output` with the same settings are
skipped. Prints the command, the settings and the table, and writes the JSON and the text beside it.

    python scripts/benchmark_moe.py --model outputs/reference-moe --output outputs/benchmark_moe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from results_file import open_results
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.data import wikitext2_test_text
from hf_prune.calibration.sources import token_windows
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.evaluation import parameter_count, perplexity

#: Tokens per evaluation window.
SEQ_LEN = 512
CRITERIA = ("reap", "gate_weight", "frequency", "magnitude", "random", "output_error", "output_error_first_order")
#: Criteria measured again with `expert_repair="merge"`.
MERGED = ("gate_weight", "output_error", "reap")


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


@torch.no_grad()
def forward_pass(model, batches) -> None:
    for batch in batches:
        model(batch)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/reference-moe", help="folder of make_reference_moe.py")
    parser.add_argument("--output", default="outputs/benchmark_moe.json")
    parser.add_argument("--experts", type=float, default=0.25, help="fraction (< 1) or count of experts per layer")
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument("--merge", nargs="*", default=list(MERGED), help="criteria also run with the merge repair")
    parser.add_argument("--windows", type=int, default=20, help=f"first N {SEQ_LEN}-token test windows")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--timing-repeats", type=int, default=3, help="interleaved runs of each timed pass (the fastest is kept)"
    )
    parser.add_argument(
        "--retime", action="store_true", help="time the passes again (into the file's info) even if every row is done"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    experts = int(args.experts) if args.experts >= 1 else args.experts

    folder = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    made = folder / "reference_moe.json"
    reference = json.loads(made.read_text(encoding="utf-8"))["settings"] if made.is_file() else {}
    ids = tokenizer(wikitext2_test_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    ids = ids[: args.windows * SEQ_LEN]
    calibration = PruningConfig(num_samples=args.num_samples)
    setting = {
        "model": str(folder),
        "reference_settings": {k: v for k, v in reference.items() if k not in ("output", "threads", "command")},
        "experts": experts,
        "windows": ids.numel() // SEQ_LEN,
        "seq_len": SEQ_LEN,
        "calibration": f"{calibration.calibration} valid, seed {calibration.seed}, seq_len {calibration.seq_len}",
        "num_samples": args.num_samples,
        "threads": args.threads,
    }
    results = open_results(args.output, setting, __file__, argv, parser)
    if "dense" not in results:
        results.save_row("dense", {"perplexity": perplexity(model, ids), "parameters": parameter_count(model)})
    dense = results.rows["dense"]
    print(f"{'dense':34} ppl {dense['perplexity']:10.2f}", flush=True)

    pruner = HFPruner(model, tokenizer=tokenizer)
    windows = token_windows(calibration.calibration, tokenizer, args.num_samples, calibration.seq_len)
    batches = windows.split(8)
    statistics = None
    if args.retime:
        statistics = timed_passes(model, pruner.adapter, batches, results.info, args.timing_repeats)
        results.save()
    runs = [(criterion, "none") for criterion in args.criteria] + [(criterion, "merge") for criterion in args.merge]
    for criterion, repair in runs:
        name = f"experts/{criterion}" + ("+merge" if repair == "merge" else "")
        if name in results:
            continue
        if statistics is None:
            statistics = timed_passes(model, pruner.adapter, batches, results.info, args.timing_repeats)
        candidate = HFPruner(copy.deepcopy(model), tokenizer=tokenizer)
        start = time.perf_counter()
        config = PruningConfig(
            experts=experts,
            criterion=criterion,
            reconstruct="none",
            expert_repair=repair,
            num_samples=args.num_samples,
        )
        report = candidate.prune(config, statistics=statistics)
        seconds = time.perf_counter() - start
        value = perplexity(candidate.model, ids)
        row = {
            "criterion": criterion,
            "expert_repair": repair,
            "parameters": report.parameters_after,
            "perplexity": value,
            "ratio": value / dense["perplexity"],
            "prune_seconds_without_calibration": seconds,
            "format": report.output_format,
        }
        results.save_row(name, row)
        print(f"{name:34} ppl {value:10.2f}  ×{row['ratio']:6.3f}  {seconds:6.1f} s", flush=True)

    results.report(table_text(results, list(dict.fromkeys(args.criteria + args.merge))))
    return results.rows


def timed_passes(model, adapter, batches, info: dict, repeats: int = 3):
    """Time a plain forward pass, the moments pass, the pass the expert criteria read (with moments) and the same
    with `expert_removal` (what `output_error` reads) over `batches`, into `info`; returns the last statistics.

    The four are timed `repeats` times in turn (forward, moments, experts, removal, forward, ...) and each keeps
    its fastest run (`*_seconds`; every run under `*_runs`): other load on the machine slows runs, never speeds
    them up, so the minimum of interleaved runs is the least disturbed ratio."""
    forward_pass(model, batches[:1])  # warm-up, untimed
    experts = {"moments", "routing", "expert_norms"}
    passes = {
        "forward": lambda: forward_pass(model, batches),
        "moments_pass": lambda: collect_statistics(model, adapter, batches, {"moments"}),
        "experts_pass": lambda: collect_statistics(model, adapter, batches, experts),
        "removal_pass": lambda: collect_statistics(model, adapter, batches, experts | {"expert_removal"}),
    }
    runs: dict[str, list[float]] = {name: [] for name in passes}
    statistics = None
    for _ in range(repeats):
        for name, run in passes.items():
            value, seconds = timed(run)
            runs[name].append(seconds)
            statistics = value if name == "removal_pass" else statistics
    for name, seconds in runs.items():
        info[f"{name}_seconds"], info[f"{name}_runs"] = min(seconds), seconds
    info["timing_repeats"] = repeats
    for name in ("experts", "removal"):
        info[f"{name}_pass_over_moments_pass"] = info[f"{name}_pass_seconds"] / info["moments_pass_seconds"]
        info[f"{name}_pass_over_forward"] = info[f"{name}_pass_seconds"] / info["forward_seconds"]
    return statistics


def table_text(results, criteria: list[str]) -> str:
    setting, rows, info = results.settings, results.rows, results.info
    lines = [
        f"reference MoE {setting['model']}, experts={setting['experts']} per layer, WikiText-2 test, first "
        f"{setting['windows']} windows of {SEQ_LEN} tokens; dense perplexity {rows['dense']['perplexity']:.2f}",
        f"{'row':34} {'params':>12} {'perplexity':>11} {'× dense':>8} {'prune s':>8}",
        f"{'dense':34} {rows['dense']['parameters']:>12,} {rows['dense']['perplexity']:>11.2f} {1:>8.3f} {'':>8}",
    ]
    names = [f"experts/{criterion}{suffix}" for suffix in ("", "+merge") for criterion in criteria]
    for name in names:
        row = rows.get(name)
        if row is not None:
            lines.append(
                f"{name:34} {row['parameters']:>12,} {row['perplexity']:>11.2f} "
                f"{row['ratio']:>8.3f} {row['prune_seconds_without_calibration']:>8.2f}"
            )
    if "experts_pass_seconds" in info:
        forward, moments, experts = info["forward_seconds"], info["moments_pass_seconds"], info["experts_pass_seconds"]
        repeats = info.get("timing_repeats", 1)
        lines.append(
            f"calibration pass, {setting['num_samples']} windows, fastest of {repeats} interleaved runs: "
            f"forward {forward:.1f} s, moments {moments:.1f} s, "
            f"routing + expert_norms + moments {experts:.1f} s ({experts / moments:.2f}× moments, "
            f"{experts / forward:.2f}× forward)"
        )
    if "removal_pass_seconds" in info:
        removal = info["removal_pass_seconds"]
        lines.append(
            f"with expert_removal (output_error) {removal:.1f} s ({removal / moments:.2f}× moments, "
            f"{removal / experts:.2f}× the pass without it)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
