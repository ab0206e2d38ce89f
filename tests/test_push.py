"""Push: one `upload_folder` commit with weights, config, tokenizer, card and plot; the repo created if
needed; tokens never shown; a failed push leaves the folder intact and says how to retry."""

import os
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import HfApi
from tiny_models import FAMILIES, STRUCTURAL
from tiny_tokenizer import tiny_tokenizer

from hf_prune import HFPruner
from hf_prune.cli import main
from hf_prune.errors import PushError
from hf_prune.output.card import Measurement
from hf_prune.output.hub import plan_push, push_folder

TOKEN = "hf_secretTOKEN123"
FILES = [
    "README.md",
    "config.json",
    "generation_config.json",
    "hf_prune_recipe.yaml",
    "model.safetensors",
    "pruning_plot.png",
    "tokenizer.json",
    "tokenizer_config.json",
]


def mock_api(seen: list) -> mock.MagicMock:
    """An HfApi whose upload_folder records which files the folder held at upload time."""
    api = mock.create_autospec(HfApi, instance=True)

    def upload_folder(*, folder_path, allow_patterns, **kwargs):
        seen.append(sorted(p.name for p in Path(folder_path).iterdir() if p.name in allow_patterns))
        return mock.Mock(commit_url="https://huggingface.co/me/pruned/commit/abc")

    api.upload_folder.side_effect = upload_folder
    return api


@pytest.fixture
def pruner() -> HFPruner:
    pruner = HFPruner(FAMILIES["llama"].build(), tokenizer=tiny_tokenizer())
    pruner.prune(mlp_neurons=0.25, **STRUCTURAL)
    return pruner


def test_push_to_hub_sends_the_saved_folder_in_one_commit(pruner, tmp_path):
    folder = pruner.save_pretrained(tmp_path / "pruned")
    seen = []
    api = mock_api(seen)
    url = pruner.push_to_hub("me/pruned", private=True, token=TOKEN, api=api)
    assert url == "https://huggingface.co/me/pruned/commit/abc"
    api.create_repo.assert_called_once_with("me/pruned", token=TOKEN, private=True, repo_type="model", exist_ok=True)
    api.upload_folder.assert_called_once()
    kwargs = api.upload_folder.call_args.kwargs
    assert (kwargs["repo_id"], kwargs["folder_path"], kwargs["token"]) == ("me/pruned", str(folder), TOKEN)
    assert kwargs["allow_patterns"] == FILES and seen == [FILES]
    assert "upload_file" not in {call[0] for call in api.method_calls}  # never a second commit
    assert plan_push(folder, "me/pruned").card_metadata["tags"] == ["pruned", "structured-pruning", "hf_prune"]


def test_push_to_hub_without_a_save_stages_a_temporary_folder(pruner, tmp_path):
    seen = []
    pruner.push_to_hub("me/pruned", api=mock_api(seen))
    assert seen == [FILES]
    pruner.save_pretrained(tmp_path / "saved")
    pruner.prune(mlp_neurons=0.25, **STRUCTURAL)  # the saved folder no longer holds this model: stage again
    api = mock_api(seen)
    pruner.push_to_hub("me/pruned", api=api)
    assert api.upload_folder.call_args.kwargs["folder_path"] != str(tmp_path / "saved")


def test_a_failed_push_keeps_the_folder_hides_the_token_and_says_how_to_retry(pruner, tmp_path):
    folder = pruner.save_pretrained(tmp_path / "pruned")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    api = mock_api([])
    api.upload_folder.side_effect = RuntimeError(f"401 Unauthorized for token {TOKEN}")
    with pytest.raises(PushError) as caught:
        push_folder(folder, "me/pruned", token=TOKEN, api=api)
    message = str(caught.value)
    assert TOKEN not in message and "***" in message
    assert f"retry with `hf-prune push {folder} me/pruned`" in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_cli_push_dry_run_lists_files_and_metadata_and_sends_nothing(pruner, tmp_path, capsys, monkeypatch):
    folder = pruner.save_pretrained(tmp_path / "pruned")
    monkeypatch.setattr("hf_prune.output.hub.HfApi", mock.Mock(side_effect=AssertionError("no Hub call in a dry run")))
    assert main(["push", str(folder), "me/pruned", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"me/pruned ← {folder}: {len(FILES)} files in one commit" in out
    assert all(name in out for name in FILES)
    assert "tags: ['pruned', 'structured-pruning', 'hf_prune']" in out and "dry run: nothing sent" in out
    assert "evaluation results (model-index, self-reported):\n  none: nothing was measured" in out


def test_cli_push_dry_run_shows_the_evaluation_results_the_card_holds(pruner, tmp_path, capsys, monkeypatch):
    pruner.card_facts.measurements += [
        Measurement(
            "WikiText-2 perplexity",
            30.0,
            36.5,
            "first 2 windows",
            dataset="Salesforce/wikitext",
            dataset_name="WikiText-2",
            dataset_config="wikitext-2-raw-v1",
            split="test",
            metric_type="perplexity",
        ),
        Measurement("latency (ms)", 10.0, 8.25, "batch 1 × 16 tokens", kind="speed", dataset_name="random input_ids"),
    ]
    folder = pruner.save_pretrained(tmp_path / "pruned")
    monkeypatch.setattr("hf_prune.output.hub.HfApi", mock.Mock(side_effect=AssertionError("no Hub call in a dry run")))
    assert main(["push", str(folder), "me/pruned", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "evaluation results (model-index, self-reported):\n"
        "  perplexity = 36.5 on WikiText-2 (Salesforce/wikitext, wikitext-2-raw-v1, test), text-generation: "
        "WikiText-2 perplexity: first 2 windows\n"
        "  latency_ms = 8.25 on random input_ids (custom), text-generation: latency (ms): batch 1 × 16 tokens\n"
    ) in out
    assert "model-index:" not in out  # shown as the lines above, not as the raw metadata
    assert "datasets: ['Salesforce/wikitext']" in out


def test_cli_push_uploads_with_one_commit_and_failures_exit_1(pruner, tmp_path, capsys, monkeypatch):
    folder = pruner.save_pretrained(tmp_path / "pruned")
    api = mock_api([])
    monkeypatch.setattr("hf_prune.output.hub.HfApi", lambda: api)
    assert main(["push", str(folder), "me/pruned", "--private"]) == 0
    assert api.upload_folder.call_count == 1 and api.create_repo.call_args.kwargs["private"] is True
    assert "pushed" in capsys.readouterr().out
    api.create_repo.side_effect = OSError("network down")
    assert main(["push", str(folder), "me/pruned"]) == 1
    assert "The folder is unchanged; retry with" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "me/pruned"]) == 1  # not a saved folder


@pytest.mark.hub
def test_real_push_to_the_hub(pruner):
    repo_id = os.environ.get("HF_PRUNE_TEST_REPO")
    if not repo_id or not os.environ.get("HF_TOKEN"):
        pytest.skip("set HF_TOKEN and HF_PRUNE_TEST_REPO (a repo you may overwrite) to push for real")
    pruner.push_to_hub(repo_id, private=True)
    files = set(HfApi().list_repo_files(repo_id))
    assert set(FILES) <= files
