"""The README's main job (`make demo` runs `scripts/demo.py`), once at small size in the default suite,
so a broken demo cannot land: the real SmolLM2-135M, a few calibration and evaluation windows."""

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


def test_demo_prints_its_table(smollm2, tmp_path):
    out = tmp_path / "pruned"
    process = subprocess.run(
        [sys.executable, str(DEMO), "--num-samples", "4", "--windows", "2", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    text = process.stdout
    # The plan: 1 of 3 KV groups, 25% of the neurons, 4 of 30 layers (the README's transcript).
    assert "parameters: 134,515,008 → 95,434,560 (-29.1%)" in text
    assert text.count("layer removed") == 4
    assert text.count("heads 9→6 (3→2 KV), neurons 1536→1152") == 26
    assert "output format: vanilla" in text
    assert "WikiText-2 test, first 2 × 512 tokens" in text
    rows = {
        name: (int(params.replace(",", "")), float(ppl), float(ms))
        for name, params, ppl, ms in re.findall(r"^(dense|pruned)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    }
    assert rows["dense"][0] == 134_515_008 and rows["pruned"][0] == 95_434_560
    dense_ppl, pruned_ppl = rows["dense"][1], rows["pruned"][1]
    assert 5 < dense_ppl < 200 and dense_ppl < pruned_ppl  # a real model on real text, and pruning costs something
    ratio = float(re.search(r"^perplexity ratio ([\d.]+)×$", text, re.M).group(1))
    assert abs(ratio - pruned_ppl / dense_ppl) < 0.01
    assert re.search(rf"saved to {re.escape(str(out))} \(vanilla format\)$", text, re.M)
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # safetensors only
