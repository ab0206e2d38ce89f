"""`hf-prune inspect`, `prune --dry-run`, `eval`, the summary table and the teaching `--help`."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import FAMILIES
from tiny_tokenizer import tiny_tokenizer

from hf_prune.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny llama (with a tokenizer), gpt2 and bert folders, and the llama's config.json alone."""
    root = tmp_path_factory.mktemp("models")
    for name in ("llama", "gpt2", "bert"):
        FAMILIES[name].build().save_pretrained(root / name)
    tiny_tokenizer().save_pretrained(root / "llama")
    (root / "llama-config-only").mkdir()
    shutil.copy(root / "llama" / "config.json", root / "llama-config-only")
    return root


def test_inspect_reads_shapes_only_and_tells_groups_shares_and_formats(models, capsys):
    assert main(["inspect", str(models / "llama-config-only")]) == 0  # no weights in that folder
    out = capsys.readouterr().out
    assert "LlamaForCausalLM (llama), 4 layers, 185,376 parameters" in out
    assert "      0-3      6         3        16           48" in out
    assert "attention heads           24        73,728   39.8%  vanilla" in out
    assert "KV groups                 12       110,592   59.7%  vanilla" in out
    assert "MLP neurons              192        55,296   29.8%  vanilla" in out
    assert (
        "attention branches         4       110,592   59.7%  loader (some attention or MLP branches were removed"
        in out
    )
    assert "layers                     4       166,656   89.9%  vanilla" in out


def test_inspect_says_why_head_pruning_needs_the_loader_format(models, capsys):
    assert main(["inspect", str(models / "gpt2")]) == 0
    out = capsys.readouterr().out
    assert "\nKV groups " not in out  # multi-head attention: heads are their own KV groups
    assert "attention heads           16" in out and "loader (GPT2Config rejects the pruned shapes" in out


def test_prune_dry_run_prints_plan_and_resulting_config_and_writes_nothing(models, tmp_path, capsys):
    code = main(
        [
            "prune",
            "--model",
            str(models / "llama"),
            "--kv-groups",
            "1",
            "--layers",
            "1",
            "--dry-run",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "out").exists()
    assert "heads 6→4 (3→2 KV)" in out and "layer removed" in out
    assert '"kv_groups": 1' in out  # the resulting PruningConfig
    assert "num_key_value_heads: 3 → 2" in out and "num_hidden_layers: 4 → 3" in out
    assert "dry run: nothing written" in out and "output           not written (--dry-run)" in out


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_prune_measures_before_and_after_into_the_summary_and_the_card(models, tmp_path, capsys, one_thread):
    code = main(
        [
            "prune",
            "--model",
            str(models / "llama"),
            "--output",
            str(tmp_path / "out"),
            "--mlp-neurons",
            "0.5",
            "--eval-windows",
            "2",
            "--latency",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    summary = out[out.index("\nsummary") :]
    for row in (
        "load model (s)",
        "perplexity before (s)",
        "prune (s)",
        "save (s)",
        "parameters",
        "FLOPs per token",
        "WikiText-2 perplexity",
        "latency (ms)",
        f"{tmp_path / 'out'} (vanilla format)",
    ):
        assert row in summary, row
    card = (tmp_path / "out" / "README.md").read_text()
    assert "datasets:\n- Salesforce/wikitext" in card and "| WikiText-2 perplexity |" in card
    assert "first 2 non-overlapping windows of 512 tokens" in card and "| latency (ms) |" in card
    assert (
        "one forward pass on a 1 × 128 input, median of 5 after 1 warm-up, cpu, torch.float32, torch threads: 1"
        in card
    )
    assert f"hf-prune prune --model {models / 'llama'} --output {tmp_path / 'out'} --mlp-neurons 0.5" in card
    # The model-index holds the after column of both rows, read back by huggingface_hub.
    results = {r.metric_type: r for r in ModelCard.load(tmp_path / "out" / "README.md").data.eval_results}
    assert set(results) == {"perplexity", "latency_ms"}
    for metric, kind in (("WikiText-2 perplexity", "perplexity"), ("latency (ms)", "latency_ms")):
        after = next(line for line in card.splitlines() if line.startswith(f"| {metric} |")).split(" | ")[2]
        assert f"{results[kind].metric_value:,.2f}" == after, metric
    wikitext = results["perplexity"]
    assert (wikitext.dataset_type, wikitext.dataset_config, wikitext.dataset_split) == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "test",
    )
    assert "first 2 non-overlapping windows of 512 tokens" in wikitext.metric_name
    assert (results["latency_ms"].dataset_type, results["latency_ms"].dataset_name) == ("custom", "random input_ids")
    assert "torch threads: 1" in results["latency_ms"].metric_name


def test_eval_reports_perplexity_and_size(models, tmp_path, capsys):
    main(["prune", "--model", str(models / "llama"), "--output", str(tmp_path / "out"), "--attention-branches", "1"])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--windows", "2", "--seq-len", "64"]) == 0  # loader format
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "perplexity" in out
    assert "first 2 non-overlapping windows of 64 tokens" in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["prune", "--model", "MODELS/llama", "--mlp-neurons", "0.5"], "--output is required"),
        (["eval", "MODELS/bert"], "BertForMaskedLM is not one"),
        (["eval", "MODELS/llama", "--windows", "0"], "--windows must be >= 1"),
        (
            ["prune", "--model", "MODELS/bert", "--output", "OUT", "--layers", "1", "--eval-windows", "2"],
            "causal language models",
        ),
    ],
)
def test_bad_arguments_exit_2(models, tmp_path, capsys, arguments, message):
    arguments = [a.replace("MODELS", str(models)).replace("OUT", str(tmp_path / "out")) for a in arguments]
    assert main(arguments) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_missing_model_exits_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 1
    assert "failed" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "prune", "eval", "push"])
def test_every_command_teaches_with_examples(command, capsys):
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert caught.value.code == 0 and "examples:" in out and "hf-prune " + command in out


def test_report_json_still_written(models, tmp_path):
    main(
        [
            "prune",
            "--model",
            str(models / "llama"),
            "--output",
            str(tmp_path / "out"),
            "--layers",
            "1",
            "--report-json",
            str(tmp_path / "report.json"),
        ]
    )
    assert json.loads((tmp_path / "report.json").read_text())["parameters_after"] < 185_376
