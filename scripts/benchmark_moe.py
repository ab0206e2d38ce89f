"""Zero-shot expert pruning of the reference MoE (issue 16): WikiText-2 perplexity per expert criterion.

The model is the folder `scripts/make_reference_moe.py` writes (SmolLM2-135M MoEfied into a Mixtral). Each
row removes `--experts` of every layer's routed experts (a fraction or a count) with one criterion, no
repair, from one calibration pass shared by every row (`--num-samples` windows of 512 tokens of the
project's default calibration text, WikiText-2 validation, seed 0). Perplexity: the project's protocol on
the WikiText-2 raw test split, the first `--windows` windows of 512 tokens.

Cost of scoring: the seconds of the calibration pass that collects what the expert criteria read
(`routing` and `expert_norms`) against the pass that collects activation moments only (what the dense
criteria read) and a plain forward pass over the same windows (issue goal: ≤ 1.1× the statistics pass).

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
CRITERIA = ("reap", "gate_weight", "frequency", "magnitude", "random")


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
    parser.add_argument("--windows", type=int, default=20, help=f"first N {SEQ_LEN}-token test windows")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
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
    print(f"{'dense':24} ppl {dense['perplexity']:10.2f}", flush=True)

    pruner = HFPruner(model, tokenizer=tokenizer)
    windows = token_windows(calibration.calibration, tokenizer, args.num_samples, calibration.seq_len)
    batches = windows.split(8)
    statistics = None
    for criterion in args.criteria:
        name = f"experts/{criterion}"
        if name in results:
            continue
        if statistics is None:
            forward_pass(model, batches[:1])  # warm-up, untimed
            _, results.info["forward_seconds"] = timed(forward_pass, model, batches)
            _, results.info["moments_pass_seconds"] = timed(
                collect_statistics, model, pruner.adapter, batches, {"moments"}
            )
            statistics, seconds = timed(
                collect_statistics, model, pruner.adapter, batches, {"moments", "routing", "expert_norms"}
            )
            results.info["experts_pass_seconds"] = seconds
            results.info["experts_pass_over_moments_pass"] = seconds / results.info["moments_pass_seconds"]
            results.info["experts_pass_over_forward"] = seconds / results.info["forward_seconds"]
        candidate = HFPruner(copy.deepcopy(model), tokenizer=tokenizer)
        start = time.perf_counter()
        report = candidate.prune(
            PruningConfig(experts=experts, criterion=criterion, reconstruct="none", num_samples=args.num_samples),
            statistics=statistics,
        )
        seconds = time.perf_counter() - start
        value = perplexity(candidate.model, ids)
        row = {
            "criterion": criterion,
            "parameters": report.parameters_after,
            "perplexity": value,
            "ratio": value / dense["perplexity"],
            "prune_seconds_without_calibration": seconds,
            "format": report.output_format,
        }
        results.save_row(name, row)
        print(f"{name:24} ppl {value:10.2f}  ×{row['ratio']:6.3f}  {seconds:6.1f} s", flush=True)

    results.report(table_text(results, args.criteria))
    return results.rows


def table_text(results, criteria: list[str]) -> str:
    setting, rows, info = results.settings, results.rows, results.info
    lines = [
        f"reference MoE {setting['model']}, experts={setting['experts']} per layer, WikiText-2 test, first "
        f"{setting['windows']} windows of {SEQ_LEN} tokens; dense perplexity {rows['dense']['perplexity']:.2f}",
        f"{'row':24} {'params':>12} {'perplexity':>11} {'× dense':>8} {'prune s':>8}",
        f"{'dense':24} {rows['dense']['parameters']:>12,} {rows['dense']['perplexity']:>11.2f} {1:>8.3f} {'':>8}",
    ]
    for criterion in criteria:
        row = rows.get(f"experts/{criterion}")
        if row is not None:
            lines.append(
                f"{'experts/' + criterion:24} {row['parameters']:>12,} {row['perplexity']:>11.2f} "
                f"{row['ratio']:>8.3f} {row['prune_seconds_without_calibration']:>8.2f}"
            )
    if "experts_pass_seconds" in info:
        forward, moments, experts = info["forward_seconds"], info["moments_pass_seconds"], info["experts_pass_seconds"]
        lines.append(
            f"calibration pass, {setting['num_samples']} windows: forward {forward:.1f} s, moments {moments:.1f} s, "
            f"routing + expert_norms + moments {experts:.1f} s ({experts / moments:.2f}× moments, "
            f"{experts / forward:.2f}× forward)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
