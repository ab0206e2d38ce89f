"""Every save writes a model card: Hub-valid metadata, a per-layer table and plot, honest numbers,
how to load it and how to reproduce it."""

import dataclasses
import tomllib
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index
from tiny_models import FAMILIES, STRUCTURAL

import hf_prune
from hf_prune import HFPruner, PruningConfig
from hf_prune.evaluation import flops_per_token
from hf_prune.output.card import (
    CardFacts,
    CardInputs,
    Measurement,
    relative_change,
    template_path,
    write_model_card,
)

REPO = Path(__file__).resolve().parents[1]
# What the Hub's model-card metadata may hold here; `base_model_relation` only takes adapter,
# merge, quantized or finetune, none of which a prune is, so it must never appear.
ALLOWED_METADATA = {"base_model", "license", "library_name", "pipeline_tag", "tags", "datasets", "model-index"}

# Measured numbers, as the CLI records them (`hf-prune prune --eval-windows --latency`) and for an image model.
PERPLEXITY = Measurement(
    "WikiText-2 perplexity",
    30.0,
    36.0,
    "first 2 windows",
    dataset="Salesforce/wikitext",
    dataset_name="WikiText-2",
    dataset_config="wikitext-2-raw-v1",
    split="test",
    metric_type="perplexity",
)
TOP1 = Measurement(
    "CIFAR-10 top-1 (%)",
    81.2,
    78.5,
    "CIFAR-10 test split, 10,000 images",
    dataset="uoft-cs/cifar10",
    dataset_name="CIFAR-10",
    split="test",
    metric_type="accuracy",
)
LATENCY = Measurement(
    "latency (ms)",
    10.0,
    8.0,
    "batch 1 × 16 tokens",
    kind="speed",
    dataset_name="random input_ids",
    metric_type="latency_ms",
)


def metadata_and_body(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front_matter, body = text.split("---\n", 2)
    return yaml.safe_load(front_matter), body


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory) -> tuple[HFPruner, Path]:
    pruner = HFPruner(FAMILIES["llama"].build())
    pruner.prune(kv_groups=1, mlp_neurons=0.25, layers=1, **STRUCTURAL)
    return pruner, pruner.save_pretrained(tmp_path_factory.mktemp("card") / "llama-pruned")


def test_metadata_is_hub_valid_and_claims_nothing_unknown(vanilla):
    _, folder = vanilla
    metadata, _ = metadata_and_body(folder)
    assert set(metadata) <= ALLOWED_METADATA
    assert metadata["tags"] == ["pruned", "structured-pruning", "hf_prune"]
    assert (metadata["library_name"], metadata["pipeline_tag"]) == ("transformers", "text-generation")
    # Built from a model object: no known base repo, license or evaluation data, and nothing measured.
    assert not {"base_model", "license", "datasets", "model-index"} & set(metadata)
    card = ModelCard.load(folder / "README.md")
    assert card.data.tags == metadata["tags"] and card.data.eval_results is None


def test_body_tables_plot_and_unmeasured_fields(vanilla):
    pruner, folder = vanilla
    _, body = metadata_and_body(folder)
    assert "| 0 | 6 → 4 | 3 → 2 | 48 → 36 | heads 6→4 (3→2 KV), neurons 48→36 |" in body
    assert sum(1 for layer in pruner.report.layers if layer.removed) == 1
    assert "| 1 | – | – | – | layer removed |" in body
    assert "](pruning_plot.png)" in body
    assert (folder / "pruning_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = pruner.report
    assert f"| parameters | {report.parameters_before:,} | {report.parameters_after:,} | -43.0% |" in body
    assert f"{pruner.card_facts.dense_flops:,} | {flops_per_token(pruner.model):,}" in body
    assert "Latency: not measured." in body and "## Quality\n\nNot measured." in body
    assert "**Criterion:** `magnitude`" in body and "**Repair:** none" in body
    assert f"hf_prune {hf_prune.__version__}" in body
    assert 'AutoModelForCausalLM.from_pretrained("llama-pruned")' in body and "trust_remote_code" not in body


def test_the_saved_recipe_reproduces_the_config(vanilla):
    pruner, folder = vanilla
    assert PruningConfig.from_yaml(folder / "hf_prune_recipe.yaml").to_dict() == pruner.report.config
    assert "hf-prune prune --model BASE_MODEL --recipe hf_prune_recipe.yaml" in metadata_and_body(folder)[1]


def test_loader_format_cards_explain_both_load_paths(tmp_path):
    pruner = HFPruner(FAMILIES["bert"].build())
    pruner.prune(attention_heads=1, mlp_branches=1, **STRUCTURAL)
    metadata, body = metadata_and_body(pruner.save_pretrained(tmp_path / "bert-pruned"))
    assert metadata["pipeline_tag"] == "fill-mask"
    assert 'hf_prune.load_pruned("bert-pruned")' in body
    assert 'AutoModelForMaskedLM.from_pretrained("bert-pruned", trust_remote_code=True)' in body
    assert "| 0 | 4 → 3 | 48 → 0 | heads 4→3, MLP branch removed |" in body


def test_measurements_and_source_reach_card_and_metadata(tmp_path):
    FAMILIES["gpt2"].build().save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    pruner = HFPruner.from_pretrained(tmp_path / "base")
    pruner.prune(mlp_neurons=0.5, **STRUCTURAL)
    pruner.card_facts.measurements += [
        Measurement("WikiText-2 perplexity", 30.0, 36.0, "first 2 windows", dataset="Salesforce/wikitext"),
        Measurement("latency (ms)", 10.0, 8.0, "batch 1 × 16 tokens", kind="speed"),
    ]
    metadata, body = metadata_and_body(pruner.save_pretrained(tmp_path / "out"))
    assert metadata["license"] == "mit" and metadata["datasets"] == ["Salesforce/wikitext"]
    assert "base_model" not in metadata  # a local folder is not a Hub repo
    assert "| WikiText-2 perplexity | 30.00 | 36.00 | +20.0% |" in body
    assert relative_change(30.0, 2_425_374.19) == "×80,846" and relative_change(0, 1) == "–"
    assert "| latency (ms) | 10.00 | 8.00 | -20.0% |" in body
    assert "Protocol: latency (ms): batch 1 × 16 tokens." in body
    assert "Protocol: WikiText-2 perplexity: first 2 windows." in body
    assert "not measured" not in body.lower()
    assert f'HFPruner.from_pretrained("{tmp_path / "base"}")' in body
    # Measurements that name no model-index fields: the Hub id as dataset, "custom" data, the metric's name as id.
    (perplexity, latency) = metadata["model-index"][0]["results"]
    assert perplexity["dataset"] == {"name": "Salesforce/wikitext", "type": "Salesforce/wikitext"}
    assert perplexity["metrics"] == [
        {
            "type": "wikitext_2_perplexity",
            "value": 36.0,
            "name": "WikiText-2 perplexity: first 2 windows",
            "verified": False,
        }
    ]
    assert latency["dataset"] == {"name": "custom", "type": "custom"}
    assert latency["metrics"][0]["type"] == "latency_ms" and latency["metrics"][0]["value"] == 8.0


def test_every_measured_number_goes_into_the_model_index_and_loads_back(vanilla, tmp_path):
    pruner, _ = vanilla
    facts = dataclasses.replace(pruner.card_facts, measurements=[PERPLEXITY, TOP1, LATENCY])
    write_model_card(tmp_path, CardInputs.of(pruner.model, pruner.report, facts, "llama-pruned"))
    metadata, body = metadata_and_body(tmp_path)
    # The table holds before and after; the model-index the pruned model's (after) numbers.
    assert "| WikiText-2 perplexity | 30.00 | 36.00 | +20.0% |" in body
    assert "| CIFAR-10 top-1 (%) | 81.20 | 78.50 | -3.3% |" in body
    assert "| latency (ms) | 10.00 | 8.00 | -20.0% |" in body
    # huggingface_hub's own offline checks: `ModelCard.load` parses the model-index (`model_index_to_eval_results`)
    # and validates the results, raising ValueError on what it cannot read; its writer gives back the same block.
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.model_name == "llama-pruned"
    assert eval_results_to_model_index(card.data.model_name, card.data.eval_results) == metadata["model-index"]
    got = {
        r.metric_type: (r.task_type, r.dataset_type, r.dataset_name, r.dataset_config, r.dataset_split, r.metric_value)
        for r in card.data.eval_results
    }
    assert got == {
        "perplexity": ("text-generation", "Salesforce/wikitext", "WikiText-2", "wikitext-2-raw-v1", "test", 36.0),
        "accuracy": ("text-generation", "uoft-cs/cifar10", "CIFAR-10", None, "test", 78.5),
        "latency_ms": ("text-generation", "custom", "random input_ids", None, None, 8.0),
    }
    assert {r.metric_name for r in card.data.eval_results} == {
        "WikiText-2 perplexity: first 2 windows",
        "CIFAR-10 top-1 (%): CIFAR-10 test split, 10,000 images",
        "latency (ms): batch 1 × 16 tokens",
    }
    assert all(r.verified is False and r.source_url is None for r in card.data.eval_results)
    assert metadata["datasets"] == ["Salesforce/wikitext", "uoft-cs/cifar10"]
    # The same check refuses a model-index the Hub would not read (a result without its dataset).
    broken = (tmp_path / "README.md").read_text().replace("      type: uoft-cs/cifar10\n", "", 1)
    with pytest.raises(ValueError, match="model_index"):
        ModelCard(broken)


@pytest.mark.parametrize("card_text, license", [("---\nlicense: apache-2.0\n---\n", "apache-2.0"), (None, None)])
def test_a_hub_id_becomes_base_model_with_the_license_its_card_gives(monkeypatch, card_text, license):
    def load(repo_id):  # the Hub, as ModelCard.load sees it: a card, or a failure (offline, gated, missing)
        assert repo_id == "some-org/some-model"
        if card_text is None:
            raise OSError("offline")
        return ModelCard(card_text)

    monkeypatch.setattr(ModelCard, "load", load)
    facts = CardFacts(dense_parameters=1, dense_flops=1)
    facts.record_source("some-org/some-model")
    assert (facts.base_model, facts.base_license) == ("some-org/some-model", license)


def test_the_template_lives_in_model_cards_and_every_package_is_listed_for_the_wheel():
    assert template_path() == REPO / "model_cards" / "pruned_model_card.md"
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "hf_prune").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"hf_prune.model_cards"}
    assert setuptools["package-dir"] == {"hf_prune.model_cards": "model_cards"}


# ---------------------------------------------------------------------------------------------------------------
# The standalone pruner's card, byte for byte: the files under tests/expected_cards/ were written by the code
# before the card took plain facts instead of the pruner (`python tests/test_model_card.py` rewrites them), with
# the three framework versions as placeholders.
EXPECTED = Path(__file__).resolve().parent / "expected_cards"
VERSIONS = {  # the card's "Framework versions" lines and their placeholders
    "- hf_prune ": ("HF_PRUNE_VERSION", lambda: hf_prune.__version__),
    "- transformers ": ("TRANSFORMERS_VERSION", lambda: __import__("transformers").__version__),
    "- torch ": ("TORCH_VERSION", lambda: __import__("torch").__version__),
}


def _fixed_save(case: str, folder: Path) -> Path:
    """One tiny model, pruned and saved with fixed card facts (every field the template reads)."""
    if case == "llama-vanilla":
        pruner = HFPruner(FAMILIES["llama"].build())
        pruner.prune(kv_groups=1, mlp_neurons=0.25, layers=1, **STRUCTURAL)
        facts = pruner.card_facts
        facts.source = facts.base_model = "some-org/some-model"
        facts.base_license = "apache-2.0"
        facts.command = "hf-prune prune --model some-org/some-model --recipe r.yaml --output llama-pruned"
        facts.source_weights = "dequantized to float from the GGUF file `m.gguf`"
        facts.measurements += [PERPLEXITY, LATENCY]
    else:  # loader format, built from a model object: no source, no measurements
        pruner = HFPruner(FAMILIES["bert"].build())
        pruner.prune(attention_heads=1, mlp_branches=1, **STRUCTURAL)
    return pruner.save_pretrained(folder / case)


def _with_placeholders(text: str) -> str:
    lines = text.split("\n")
    for line_start, (placeholder, version) in VERSIONS.items():
        lines = [
            placeholder.join(line.rsplit(version(), 1)) if line.startswith(line_start) else line for line in lines
        ]
    return "\n".join(lines)


@pytest.mark.parametrize("case", ["llama-vanilla", "bert-loader"])
def test_the_standalone_card_is_unchanged_for_fixed_facts(tmp_path, case):
    folder = _fixed_save(case, tmp_path)
    for name in ("README.md", "hf_prune_recipe.yaml"):
        expected = (EXPECTED / f"{case}.{name}").read_bytes()
        assert _with_placeholders((folder / name).read_text()).encode() == expected, name


if __name__ == "__main__":  # rewrite the expectations (only when a card change is meant)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        for case in ("llama-vanilla", "bert-loader"):
            folder = _fixed_save(case, Path(scratch))
            for name in ("README.md", "hf_prune_recipe.yaml"):
                (EXPECTED / f"{case}.{name}").write_text(_with_placeholders((folder / name).read_text()))
