"""Fresh-process load of loader-format folders, run by test_remote_code.py:
`python load_remote_code.py remote|hf_prune ROOT`.

`remote`: hf_prune is made unimportable first, then every `ROOT/<case>/model` loads with
`AutoModelFor*.from_pretrained(..., trust_remote_code=True)` (the folder's `modeling_hf_prune.py`).
`hf_prune`: `hf_prune.load_pruned`, and the folder's remote code must stay unused.
Prints one JSON line: {case: {"class", "max_abs_diff"}}.
"""

import json
import sys
from pathlib import Path

if sys.argv[1] == "remote":
    sys.modules["hf_prune"] = None  # `import hf_prune` now raises ImportError

import torch
import transformers
from safetensors.torch import load_file


def main(mode: str, root: Path) -> None:
    results = {}
    for case in sorted(p for p in root.iterdir() if (p / "model" / "config.json").exists()):
        expected = load_file(str(case / "expected.safetensors"))
        if mode == "remote":
            auto_class = getattr(transformers, (case / "auto_class.txt").read_text().strip())
            model = auto_class.from_pretrained(case / "model", trust_remote_code=True)
        else:
            import hf_prune

            model = hf_prune.load_pruned(case / "model")
        inputs = {k: expected[k] for k in ("input_ids", "pixel_values") if k in expected}
        with torch.no_grad():
            logits = model.eval()(**inputs).logits
        results[case.name] = {
            "class": type(model).__name__,
            "max_abs_diff": (logits - expected["logits"]).abs().max().item(),
        }
    remote_used = any(name.startswith("transformers_modules") for name in sys.modules)
    assert remote_used == (mode == "remote"), f"remote code used: {remote_used} in mode {mode}"
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
