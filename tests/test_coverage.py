"""The coverage sweep (scripts/coverage.py, issue 15): a representative dozen model types pruned, saved and
reloaded in fresh worker processes; the shrink rule's per-stage lists; a worker past its time limit is
replaced; the full sweep is the `slow` test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers
from script_modules import script_module

from hf_prune.derivation.derive import LIST_WIDTH, tiny_config

coverage = script_module("coverage")

V, L, T = "vanilla", "loader", "traced"
#: Model type → (block family, kinds that must round-trip with their format); each a different case:
#: hand-written GQA decoder, derived decoders (separate and fused q/k/v), post-LN encoder, ViTs (hand-written,
#: derived, backbone config with stage names), convolutional (hand-written, traced), MoE, state-space.
DOZEN = {
    "llama": ("attention + MLP", {"heads": V, "kv_groups": V, "neurons": V, "layers": V, "combined": V}),
    "opt": ("attention + MLP", {"neurons": V, "layers": V, "heads": L, "combined": L}),
    "gpt2": ("attention + MLP", {"neurons": V, "layers": V, "heads": L}),
    "bert": ("attention + MLP", {"neurons": V, "layers": V, "heads": L, "mlp_branches": L}),
    "olmo": ("attention + MLP", {"heads": L, "neurons": V, "layers": V, "attention_branches": L}),
    "vit": ("attention + MLP", {"heads": V, "neurons": V, "layers": V, "combined": V}),
    "ijepa": ("attention + MLP", {"neurons": V, "layers": V, "heads": L}),
    "beit": ("attention + MLP", {"neurons": V, "layers": V}),
    "resnet": ("convolutional", {"channels": L, "stage_channels": L}),
    "mobilenet_v1": ("convolutional", {"channels": T}),
    # heads: its config derives the head size from the head count
    "qwen3_moe": ("attention + MoE", {"heads": L, "kv_groups": L, "neurons": V, "experts": V, "layers": V}),
    "mamba": ("other", {"layers": L}),
}


class InProcess:
    """The pruning worker, in the test's own process (the reloads still run in fresh processes)."""

    def ask(self, request: dict, limit: float) -> dict:
        return coverage.prune_type(request["model_type"], request["folder"])


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    log = tmp_path_factory.mktemp("coverage") / "workers.log"
    workers = {"prune": InProcess(), **{role: coverage.Worker(role, log) for role in ("plain", "loader")}}
    try:
        yield {t: coverage.check_type(t, workers, 300, tmp_path_factory.mktemp(t)) for t in DOZEN}
    finally:
        for role in ("plain", "loader"):
            workers[role].stop()


@pytest.mark.parametrize("model_type", sorted(DOZEN))
def test_representative_types_round_trip(rows, model_type):
    family, expected = DOZEN[model_type]
    row = rows[model_type]
    assert row["family"] == family
    assert {kind: row["round_trip"].get(kind) for kind in expected} == expected, row.get("failed")
    # no verified kind ever cuts differently from its mask (the failures may only be refusals or reloads)
    assert not any("cut and masked" in why for why in row["failed"].values()), row["failed"]


def test_refusals_are_typed_and_say_why(rows):
    assert "MambaBlock" in rows["mamba"]["refused"]["neurons"]
    assert rows["llama"]["adapter"] == "hand-written" and rows["opt"]["adapter"] == "derived"
    assert rows["mobilenet_v1"]["adapter"] == "traced"
    assert "kv_groups" in rows["bert"]["not_applicable"]  # multi-head attention: a KV group is one head


def test_totals_count_rows(rows):
    """The totals table against counts made here from the rows."""
    text = coverage.totals(rows, "family", coverage.FAMILIES)
    attention = [r for r in rows.values() if r["family"] == "attention + MLP"]
    both = sum({"neurons", "layers"} <= set(r["round_trip"]) for r in attention)
    heads = sum({"neurons", "layers", "heads"} <= set(r["round_trip"]) for r in attention)
    line = next(x for x in text.splitlines() if x.startswith("| attention + MLP |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[1] == str(len(attention)) and cells[3].startswith(f"{both} (") and cells[4].startswith(f"{heads} (")
    moe = [r for r in rows.values() if r["family"] == "attention + MoE"]
    line = next(x for x in text.splitlines() if x.startswith("| attention + MoE |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[5].startswith(f"{sum('experts' in r['round_trip'] for r in moe)} (")
    markdown = coverage.table(rows, dict.fromkeys(rows, "causal-lm"))
    assert all(f"| {t} |" in markdown for t in rows)


def test_shrink_rule_per_stage_lists():
    """Widths divided by one power of two for every width list of a config (ratios and stage equalities kept),
    depths capped at 2, backbone stage indices dropped; checked against the defaults by hand."""
    resnet = tiny_config(transformers.ResNetConfig)
    assert resnet.hidden_sizes == [16, 32, 64, 128] and resnet.depths == [2, 2, 2, 2]  # 256..2048 / 16
    defaults, tiny = transformers.EfficientNetConfig(), tiny_config(transformers.EfficientNetConfig)
    assert max(tiny.out_channels) <= LIST_WIDTH < max(defaults.out_channels)
    factor = defaults.out_channels[0] // tiny.out_channels[0]
    assert tiny.out_channels == [c // factor for c in defaults.out_channels]
    assert tiny.in_channels == [c // factor for c in defaults.in_channels]
    assert tiny.in_channels[1:] == tiny.out_channels[:-1]
    assert list(tiny.kernel_sizes) == list(defaults.kernel_sizes) and list(tiny.strides) == list(defaults.strides)
    beit = tiny_config(transformers.BeitConfig)
    assert beit.out_indices == [beit.num_hidden_layers]  # the class's default: the last stage


def test_a_worker_past_its_time_limit_is_replaced(tmp_path):
    worker = coverage.Worker("prune", tmp_path / "log")
    assert worker.ask({"model_type": "llama", "folder": str(tmp_path)}, limit=0.05) is None
    assert worker.process is None  # killed; the next request starts a fresh one


@pytest.mark.slow
def test_full_sweep(tmp_path):
    """Every type of the four task classes: the sweep finishes with one row each, and no kind an adapter
    verified ever cuts differently from its mask or reloads to other logits."""
    output = tmp_path / "coverage.json"
    subprocess.run(
        [sys.executable, "scripts/coverage.py", "--output", str(output), "--markdown", str(tmp_path / "c.md")],
        check=True,
        timeout=3600,
    )
    rows = json.loads(output.read_text())["rows"]
    assert set(rows) == set(coverage.model_types())
    for model_type, row in rows.items():
        for kind, why in row.get("failed", {}).items():
            assert "cut and masked" not in why and "Δ" not in why, (model_type, kind, why)
