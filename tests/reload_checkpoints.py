"""Fresh-process reload check, run by the tests: `python reload_checkpoints.py AUTO_CLASS FOLDER`.

Each case folder holds `model/` (a saved checkpoint) and `expected.safetensors` (inputs, logits,
greedy tokens). Vanilla checkpoints load first with plain transformers, and the script asserts
that hf_prune was never imported for them; loader-format ones then load with hf_prune.load_pruned.
Prints one JSON line: {case: {"format", "max_abs_diff", "generate_equal"}}.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file


def check(model, expected: dict) -> dict:
    inputs = {k: expected[k] for k in ("input_ids", "pixel_values") if k in expected}
    with torch.no_grad():
        logits = model(**inputs).logits
    outcome = {"max_abs_diff": (logits - expected["logits"]).abs().max().item()}
    if "generated" in expected:
        tokens = model.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
        outcome["generate_equal"] = torch.equal(tokens, expected["generated"])
    return outcome


def main(auto_class: str, root: Path) -> None:
    cases = sorted(p for p in root.iterdir() if (p / "model" / "config.json").exists())
    loader = [c for c in cases if json.loads((c / "model" / "config.json").read_text())["model_type"] == "hf_prune"]
    results = {}
    for case in cases:
        if case in loader:
            continue
        model = getattr(transformers, auto_class).from_pretrained(case / "model").eval()
        results[case.name] = {"format": "vanilla", **check(model, load_file(str(case / "expected.safetensors")))}
    assert "hf_prune" not in sys.modules, "a vanilla checkpoint needed hf_prune"
    import hf_prune

    for case in loader:
        model = hf_prune.load_pruned(case / "model")
        results[case.name] = {"format": "loader", **check(model, load_file(str(case / "expected.safetensors")))}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
