"""YAML recipes load into the typed configs; every mistake names the file, the key and what is allowed."""

from pathlib import Path

import pytest

from hf_prune import PruningConfig, UsageError
from hf_prune.cli import main
from hf_prune.errors import RecipeError
from hf_prune.output.recipes import load_recipe, recipe_yaml
from hf_prune.training.schedule import PruningSchedule

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
REQUIRED = {
    "llama-zero-shot-20pct.yaml",
    "llama-mlp-50pct-lstsq.yaml",
    "bert-heads-and-neurons.yaml",
    "vit-cifar10-30pct.yaml",
    "gradual-cubic-finetune.yaml",
}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe.pruning, PruningConfig) and not recipe.pruning.is_empty and recipe.description
    assert PruningConfig.from_yaml(path) == recipe.pruning


def test_the_required_recipes_exist_and_the_training_one_holds_a_schedule():
    assert {p.name for p in RECIPES.glob("*.yaml")} >= REQUIRED
    recipe = load_recipe(RECIPES / "gradual-cubic-finetune.yaml")
    assert recipe.schedule == PruningSchedule(kind="cubic", start_step=0, end_step=2000, frequency=200)
    assert recipe.training["learning_rate"] == 5e-5
    assert load_recipe(RECIPES / "llama-zero-shot-20pct.yaml").schedule is None


def test_a_written_recipe_reads_back_equal(tmp_path):
    config = PruningConfig(kv_groups=1, mlp_neurons=0.25, layers=3, criterion="random", seed=7)
    (tmp_path / "r.yaml").write_text(recipe_yaml(config.to_dict(), description="test"))
    assert PruningConfig.from_yaml(tmp_path / "r.yaml") == config


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "pruning: {mlp_neurons: 0.25}\nschedual: {}\n",
            r"unknown key 'schedual'; allowed: description, pruning, schedule, training",
        ),
        (
            "pruning: {mlp_neuron: 0.25}\n",
            r"unknown key 'pruning.mlp_neuron'; allowed: kv_groups, attention_heads, mlp_neurons",
        ),
        (
            "pruning: {criterion: oracle}\n",
            r"'pruning': criterion='oracle' is unknown; choose one of activation, block_influence",
        ),
        ("pruning: {mlp_neurons: 1.5}\n", r"'pruning': mlp_neurons=1.5 is a fraction and must lie in \[0, 1\)"),
        ("pruning: {seed: one}\n", r"'pruning.seed' must be an int, got 'one'"),
        ("pruning: {require_vanilla: 'yes'}\n", r"'pruning.require_vanilla' must be a boolean, got 'yes'"),
        ("pruning: [mlp_neurons]\n", r"'pruning' must be a mapping of PruningConfig fields"),
        ("description: x\n", r"missing key 'pruning'"),
        ("pruning: {mlp_neurons: 0.25\n", r"not valid YAML"),
        ("- a list\n", r"a recipe is a mapping"),
        ("pruning: {layers: 1}\nschedule: {frequency: 0}\n", r"'schedule': frequency=0 must be an int >= 1"),
        (
            "pruning: {layers: 1}\nschedule: {steps: 5}\n",
            r"unknown key 'schedule.steps'; allowed: kind, start_step, end_step, frequency, initial_sparsity",
        ),
        (
            "pruning: {layers: 1}\ntraining: {learning_rte: 0.1}\n",
            r"unknown key 'training.learning_rte'; allowed: the fields of transformers.TrainingArguments",
        ),
    ],
)
def test_mistakes_name_the_file_the_key_and_the_allowed_values(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert isinstance(caught.value, UsageError)  # the CLI's exit code 2


def test_a_missing_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="nowhere.yaml: cannot read the recipe"):
        PruningConfig.from_yaml(tmp_path / "nowhere.yaml")


def test_cli_recipe_with_an_override(tiny_llama, tmp_path, capsys):
    code = main(
        [
            "prune",
            "--model",
            str(tiny_llama),
            "--recipe",
            str(RECIPES / "llama-zero-shot-20pct.yaml"),
            "--mlp-neurons",
            "0.5",
            "--criterion",
            "magnitude",
            "--reconstruct",
            "none",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    config = PruningConfig.from_yaml(tmp_path / "out" / "hf_prune_recipe.yaml")
    assert (config.attention_heads, config.mlp_neurons) == (0.34, 0.5)
    assert "neurons 48→24" in capsys.readouterr().out


def test_cli_bad_recipe_exits_2_naming_the_file(tiny_llama, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("pruning: {neurons: 0.5}\n")
    code = main(
        [
            "prune",
            "--model",
            str(tiny_llama),
            "--recipe",
            str(tmp_path / "bad.yaml"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "bad.yaml: unknown key 'pruning.neurons'" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "out").exists()
