"""Issue 7's speed benchmark: what pruning costs, and what the pruned model gains.

SmolLM2-135M from the PyPI GGUF, calibration windows of WikiText-2 `wiki.valid.tokens` as the
default config draws them. Two parts:

  prune      one plain forward pass (the full causal LM, no grad) over the calibration tokens, then
             a prune of a fresh copy of the dense model, back to back in this process, `--repeats`
             times. `default` is the default configuration, `pruner.prune(sparsity=0.2)` (obs scores
             for heads and neurons, uniform allocation, lstsq repair); `all-kinds` also removes two
             layers (block_influence), whose lstsq fold costs a second pass up to the last removed
             layer. Reported as ratios to the forward pass: the calibration pass (goal ≤ 1.25×) and
             the whole prune (calibrate + score + plan + surgery + repair; load and save excluded;
             goal ≤ 1.5×), per stage. The median over repeats is the headline: the cores are shared.
  inference  prefill (batch 1 × 512 tokens) and decode (one token with a 512-token cache, batch 1
             and 8) of pruned models against the dense one, measured interleaved, beside the ideal
             ratio of forward FLOPs per token (`hf_prune.evaluation.flops_per_token`, 512 context).
             Shapes only matter here, so these prunes use `magnitude` without repair.
             The `round64` rows ask `PruningConfig(round_to=64)` for the same fraction; the unrounded
             rows keep odd widths.

Results go to `--output` (JSON) after every row, with every setting that changes the numbers
(results_file.py: calibration size, threads, inference repeats, package versions); finished rows
are skipped when the script runs again with the same settings, other settings are refused. Prune
repeats are rows (`prune/<config>/<repeat>`), so `--repeats 3` after `--repeats 2` adds one. The
table covers this command's rows, below the command line that reproduces it.

    python scripts/benchmark_speed.py                                   # the issue's protocol
    python scripts/benchmark_speed.py --num-samples 16 --repeats 3      # a quicker look
    python scripts/benchmark_speed.py --part inference
    python scripts/benchmark_speed.py --model tiny --part prune --configs default --num-samples 4 --seq-len 32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from results_file import LANGUAGE_MODELS, language_model, open_results

import hf_prune.pruner as pruner_module
from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.sources import token_windows
from hf_prune.evaluation import flops_per_token, latency_ms, parameter_count

#: Prunes that are timed: the default configuration, and one where every default criterion takes part.
PRUNE_CONFIGS = {
    "default": {"sparsity": 0.2},
    "all-kinds": {"attention_heads": 0.34, "mlp_neurons": 0.25, "layers": 2},
}
#: Functions `HFPruner.prune` calls, timed as its stages (the rest is "other": format check, report);
#: surgery includes the format check's surgery on a meta-device copy (no data: milliseconds).
STAGES = {
    "windows": "token_windows",
    "calibration": "collect_statistics",
    "score+plan": "build_plan",
    "repair": "reconstruct",
    # What removed layers added to the stream: a second pass up to the last removed layer (lstsq folding).
    "removed-layer targets": "removed_layer_targets",
    "surgery": "apply_plan",
}
#: name → (PruningConfig amounts, whether every kept width is a multiple of 64). SmolLM2-135M:
#: 9 heads of 64 (3 KV groups), 1536 MLP neurons, 30 layers.
INFERENCE_ROWS = {
    "mlp-30%": ({"mlp_neurons": 461}, False),  # 1075 neurons kept
    "mlp-30% round64": ({"mlp_neurons": 461, "round_to": 64}, True),  # 1088 = 17 × 64 kept
    "mlp-55%": ({"mlp_neurons": 845}, False),  # 691 kept
    "mlp-55% round64": ({"mlp_neurons": 845, "round_to": 64}, True),  # 704 = 11 × 64 kept
    "kv1+mlp-25%": ({"kv_groups": 1, "mlp_neurons": 384}, True),  # 6 heads, 1152 = 18 × 64
    "layers-4": ({"layers": 4}, True),
}
PREFILL_TOKENS = 512
DECODE_BATCHES = (1, 8)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def stage_timer() -> Iterator[dict[str, float]]:
    """Wrap the functions `prune` calls so that each stage's seconds add up in the yielded dict."""
    seconds = dict.fromkeys(STAGES, 0.0)

    def timed(stage: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - start

        return wrapper

    originals = {name: getattr(pruner_module, name) for name in STAGES.values()}
    for stage, name in STAGES.items():
        setattr(pruner_module, name, timed(stage, originals[name]))
    try:
        yield seconds
    finally:
        for name, function in originals.items():
            setattr(pruner_module, name, function)


@torch.no_grad()
def plain_forward_seconds(model, windows: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for batch in windows.split(batch_size):
        model(input_ids=batch)
    return time.perf_counter() - start


def prune_row(dense, tokenizer, config: PruningConfig) -> dict:
    """One plain forward pass, then one timed prune of a copy of `dense`."""
    windows = token_windows(config.calibration, tokenizer, config.num_samples, config.seq_len, config.seed)
    forward = plain_forward_seconds(dense, windows, config.batch_size)
    pruner = HFPruner(copy.deepcopy(dense), tokenizer=tokenizer)
    with stage_timer() as seconds:
        start = time.perf_counter()
        pruner.prune(config)
        total = time.perf_counter() - start
    stages = {stage: round(value, 3) for stage, value in seconds.items()}
    stages["other"] = round(total - sum(seconds.values()), 3)
    return {
        "forward_s": round(forward, 3),
        "prune_s": round(total, 3),
        "stages_s": stages,
        "calibration_ratio": round(seconds["calibration"] / forward, 4),
        # The windows are the calibration pass's input: tokenizing them is part of calibrating.
        "calibration_with_windows_ratio": round((seconds["calibration"] + seconds["windows"]) / forward, 4),
        "prune_ratio": round(total / forward, 4),
        "tokens": windows.numel(),
        "peak_rss_mb": round(peak_rss_mb()),
    }


@torch.no_grad()
def decode_ms(model, batch: int, context: int, steps: int = 8) -> float:
    """Median milliseconds per decoded token for `batch` sequences after a `context`-token prefill."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator)
    output = model(input_ids=prompt, use_cache=True)
    cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        output = model(input_ids=token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
    return 1000 * statistics.median(times[1:])


def speed(model, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, PREFILL_TOKENS), generator=generator)
    measured = {"prefill_ms": latency_ms(model, {"input_ids": prompt}, repeats=repeats)}
    for batch in DECODE_BATCHES:
        measured[f"decode_b{batch}_ms"] = decode_ms(model, batch, PREFILL_TOKENS)
    return measured


def inference_row(dense, amounts: dict, repeats: int) -> dict:
    """Dense and pruned speeds, measured alternately so both see the same load on shared cores."""
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(PruningConfig(**amounts, criterion="magnitude", reconstruct="none"))
    pruned = pruner.model
    dense_runs, pruned_runs = [], []
    for _ in range(repeats):
        dense_runs.append(speed(dense, 3))
        pruned_runs.append(speed(pruned, 3))
    row = {
        "parameters": parameter_count(pruned),
        "ideal_flop_ratio": round(flops_per_token(dense, PREFILL_TOKENS) / flops_per_token(pruned, PREFILL_TOKENS), 4),
        "intermediate_sizes": sorted({layer.mlp.down_proj.in_features for layer in pruned.model.layers}),
    }
    for key in dense_runs[0]:
        dense_ms = statistics.median(run[key] for run in dense_runs)
        pruned_ms = statistics.median(run[key] for run in pruned_runs)
        row[key] = {
            "dense": round(dense_ms, 2),
            "pruned": round(pruned_ms, 2),
            "speedup": round(dense_ms / pruned_ms, 3),
        }
    return row


def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def table(results: dict, keys: list[str] | None = None) -> str:
    """The prune rows (each repeat, their median, stage ratios) and the inference rows among `keys`
    (default: every row of `results`)."""
    chosen = {key: results["rows"][key] for key in (results["rows"] if keys is None else keys)}
    lines = []
    for name, amounts in PRUNE_CONFIGS.items():
        repeats = {key.rsplit("/", 1)[1]: row for key, row in chosen.items() if key.startswith(f"prune/{name}/")}
        if not repeats:
            continue
        prunes = list(repeats.values())
        settings = results["settings"]
        lines += [""] if lines else []
        lines += [
            (
                f"{name} prune ({amounts}), {settings['num_samples']} × {settings['seq_len']} calibration "
                f"tokens, {len(prunes)} repeat(s), {settings['threads']} thread(s); seconds and ratios to one plain "
                "forward pass"
            ),
            f"{'repeat':>6} {'forward s':>9} {'prune s':>8} {'calib ×':>8} {'prune ×':>8}  stages (s)",
        ]
        for repeat, row in repeats.items():
            stages = ", ".join(f"{stage} {value:.1f}" for stage, value in row["stages_s"].items())
            lines.append(
                f"{repeat:>6} {row['forward_s']:>9.1f} {row['prune_s']:>8.1f} "
                f"{row['calibration_ratio']:>8.3f} {row['prune_ratio']:>8.3f}  {stages}"
            )
        lines.append(
            f"{'median':>6} {median_of(prunes, 'forward_s'):>9.1f} {median_of(prunes, 'prune_s'):>8.1f} "
            f"{median_of(prunes, 'calibration_ratio'):>8.3f} {median_of(prunes, 'prune_ratio'):>8.3f}  "
            "(goals: calibration ≤ 1.25, prune ≤ 1.5)"
        )
        stage_ratios = {
            stage: statistics.median(row["stages_s"][stage] / row["forward_s"] for row in prunes)
            for stage in prunes[0]["stages_s"]
        }
        lines.append("median stage ratios: " + ", ".join(f"{s} {r:.3f}" for s, r in stage_ratios.items()))
        lines.append(f"peak RSS {max(row['peak_rss_mb'] for row in prunes)} MB")
    inference = {key.split("/", 1)[1]: row for key, row in chosen.items() if key.startswith("inference/")}
    if inference:
        settings = results["settings"]
        lines += [""] if lines else []
        lines += [
            f"inference speed-up of pruned models (dense ms / pruned ms, medians of {settings['inference_repeats']} "
            f"interleaved measurements, {settings['threads']} thread(s)); "
            f"ideal = FLOP ratio at {PREFILL_TOKENS} context",
            (
                f"{'config':<18} {'round64':>7} {'params':>8} {'MLP width':>10} {'ideal':>6} {'prefill':>8} "
                f"{'decode b1':>9} {'decode b8':>9}"
            ),
        ]
        for name, row in inference.items():
            widths = "/".join(map(str, row["intermediate_sizes"]))
            lines.append(
                f"{name:<18} {'yes' if INFERENCE_ROWS[name][1] else 'no':>7} {row['parameters'] / 1e6:>7.1f}M "
                f"{widths:>10} {row['ideal_flop_ratio']:>6.3f} {row['prefill_ms']['speedup']:>8.3f} "
                f"{row['decode_b1_ms']['speedup']:>9.3f} {row['decode_b8_ms']['speedup']:>9.3f}"
            )
        dense = next(iter(inference.values()))
        lines.append(
            f"dense ms (first row): prefill {dense['prefill_ms']['dense']}, "
            f"decode b1 {dense['decode_b1_ms']['dense']}, decode b8 {dense['decode_b8_ms']['dense']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=LANGUAGE_MODELS, default="smollm2", help="tiny: random weights, plumbing")
    parser.add_argument("--part", choices=("all", "prune", "inference"), default="all")
    parser.add_argument("--num-samples", type=int, default=PruningConfig.num_samples)
    parser.add_argument("--seq-len", type=int, default=PruningConfig.seq_len)
    parser.add_argument("--repeats", type=int, default=3, help="prunes (each after its own forward pass)")
    parser.add_argument(
        "--configs", nargs="*", default=list(PRUNE_CONFIGS), choices=list(PRUNE_CONFIGS), help="prunes to time"
    )
    parser.add_argument("--inference-repeats", type=int, default=5, help="alternating dense/pruned measurements")
    parser.add_argument("--rows", nargs="*", default=list(INFERENCE_ROWS), choices=list(INFERENCE_ROWS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="outputs/benchmark_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # Row keys are `prune/<config>/<repeat>` and `inference/<row>`.
    settings = {
        "model": args.model,
        "calibration": f"{PruningConfig.calibration} valid, seed 0",
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "inference_repeats": args.inference_repeats,
        "prefill_tokens": PREFILL_TOKENS,
        "decode_batches": DECODE_BATCHES,
        "threads": args.threads,
        "device": "cpu",
    }
    results = open_results(args.output, settings, __file__, argv, parser)
    loaded = language_model(args.model)
    dense, tokenizer = loaded.model, loaded.tokenizer

    keys = []
    if args.part in ("all", "prune"):
        keys += [f"prune/{name}/{repeat}" for name in args.configs for repeat in range(args.repeats)]
    if args.part in ("all", "inference"):
        keys += [f"inference/{name}" for name in args.rows]
    for key in keys:
        if key in results:
            continue
        print(f"running {key} ...", flush=True)
        if key.startswith("prune/"):
            amounts = PRUNE_CONFIGS[key.split("/")[1]]
            config = PruningConfig(**amounts, num_samples=args.num_samples, seq_len=args.seq_len, seed=0)
            results.save_row(key, prune_row(dense, tokenizer, config))
        else:
            amounts = INFERENCE_ROWS[key.split("/", 1)[1]][0]
            results.save_row(key, inference_row(dense, amounts, args.inference_repeats))
    results.report(table(results.as_dict(), keys))
    return results.as_dict()


if __name__ == "__main__":
    main()
