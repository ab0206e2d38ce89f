"""Downstream tasks through lm-evaluation-harness (hf_prune.evaluation, `hf-prune eval --tasks`), offline.

- the local tasks' examples are well formed and reproduce the WikiText-2 text they come from, read here
  with the harness's detokenizer directly;
- the harness's per-example log-likelihoods and choices agree with a plain-torch forward pass;
- `hf-prune eval --tasks` prints one dense-vs-pruned table, writes JSON, and `--write-card` puts every
  number into the card's model-index, which `huggingface_hub.ModelCard.load` gives back;
- bad input (unknown task, missing folder, no baseline, no lm-eval) is refused with the argument named;
- the real SmolLM2-135M, dense against a pruned copy, on a few examples.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import FAMILIES
from tiny_tokenizer import tiny_tokenizer

from hf_prune import HFPruner
from hf_prune.calibration.data import wikitext2_test_text
from hf_prune.cli import main
from hf_prune.errors import MissingDependencyError, UnknownTaskError
from hf_prune.evaluation import evaluate_tasks, local_tasks
from hf_prune.evaluation.harness import indexed_tasks, run_harness
from hf_prune.output.card import recorded_source
from hf_prune.pypi_checkpoints import pypi_checkpoint_at

LIMIT = 3


@pytest.fixture(autouse=True)
def task_cache(tmp_path_factory, monkeypatch):
    """The built task files go to a test-local cache, never the user's."""
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A tiny Llama with 1024 positions (no example is truncated) and the word-level tokenizer, given an
    end-of-text token (the harness prefixes it to empty contexts); saved dense and pruned."""
    family = FAMILIES["llama"]
    family = dataclasses.replace(family, config={**family.config, "max_position_embeddings": 1024})
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "<unk>"
    folder = tmp_path_factory.mktemp("eval")
    dense = family.build()
    dense.save_pretrained(folder / "dense")
    tokenizer.save_pretrained(folder / "dense")
    pruner = HFPruner(family.build(), tokenizer=tokenizer)
    pruner.prune(mlp_neurons=0.5, criterion="magnitude", reconstruct="none")
    pruner.save_pretrained(folder / "pruned")
    return dense, tokenizer, folder


# --------------------------------------------------------------------------- the local tasks' data
def _paragraphs() -> list[str]:
    """Every body line of the raw test split, detokenized by the harness's own function (a reference
    for what the builders read, written without them)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    lines = [line.strip() for line in wikitext2_test_text().split("\n")]
    return [wikitext_detokenizer({"page": line + " "}).strip() for line in lines if line and line[0] != "="]


def _rows(task: str) -> list[dict]:
    return [json.loads(line) for line in local_tasks.build_task_file(task).read_text().splitlines()]


def test_local_task_examples_are_well_formed_and_come_from_the_text():
    paragraphs = set(_paragraphs())
    lastword = _rows("wikitext2_lastword")
    assert len(lastword) > 300
    for row in lastword:
        assert re.fullmatch(r"[A-Za-z]{3,}", row["target"]), row
        assert f"{row['context']} {row['target']}." in paragraphs
        assert row["target"] in re.findall(r"[A-Za-z]+", row["context"])
    nextsentence = _rows("wikitext2_nextsentence")
    assert len(nextsentence) > 1000
    labels = [row["label"] for row in nextsentence]
    assert all(0.2 < labels.count(label) / len(labels) < 0.3 for label in range(4))  # the answer's place is random
    text = "\n".join(paragraphs)
    for row in nextsentence:
        choices, answer = row["choices"], row["choices"][row["label"]]
        assert len(choices) == 4 and len(set(choices)) == 4 and all(c.strip() for c in choices), row
        assert row["context"].strip() and f"{row['context']} {answer}" in text
    # Deterministic: the same bytes from a second build in an empty cache.
    first = local_tasks.build_task_file("wikitext2_nextsentence").read_bytes()
    rebuilt = local_tasks.nextsentence_examples(local_tasks.wikitext2_articles())
    assert first == "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rebuilt).encode()


def test_malformed_examples_are_refused():
    with pytest.raises(ValueError, match="empty"):
        local_tasks.check_examples("t", [{"context": "a b", "target": " "}])
    with pytest.raises(ValueError, match="repeated"):
        local_tasks.check_examples("t", [{"context": "a", "choices": ["x", "y", "x", "z"], "label": 0}])


# --------------------------------------------------------------------------- the harness against plain torch
@torch.no_grad()
def _loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether every continuation token is the argmax, one forward pass."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = model(ids).logits[0].float().log_softmax(-1)[len(context_ids) - 1 : -1]
    target = torch.tensor(continuation_ids)
    return logprobs[torch.arange(len(target)), target].sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_harness_per_example_results_match_plain_torch(tiny):
    model, tokenizer, _ = tiny
    results = run_harness(
        model, tokenizer, ["wikitext2_lastword", "wikitext2_nextsentence"], limit=LIMIT, log_samples=True
    )
    greedy = []
    for sample in results["samples"]["wikitext2_lastword"]:
        doc = sample["doc"]
        expected, is_greedy = _loglikelihood(model, tokenizer, doc["context"], " " + doc["target"])
        (got, got_greedy), *_ = sample["filtered_resps"]
        assert got == pytest.approx(expected, abs=1e-4) and got_greedy == is_greedy
        greedy.append(is_greedy)
    assert results["results"]["wikitext2_lastword"]["acc,none"] == pytest.approx(sum(greedy) / LIMIT)
    correct = []
    for sample in results["samples"]["wikitext2_nextsentence"]:
        doc = sample["doc"]
        scores = [_loglikelihood(model, tokenizer, doc["context"], " " + choice)[0] for choice in doc["choices"]]
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
        correct.append(max(range(4), key=scores.__getitem__) == doc["label"])
    assert results["results"]["wikitext2_nextsentence"]["acc,none"] == pytest.approx(sum(correct) / LIMIT)


def test_evaluate_tasks_reports_every_metric_with_its_protocol(tiny):
    model, tokenizer, _ = tiny
    scores = evaluate_tasks(model, tokenizer, "wikitext2_ppl, wikitext2_lastword", limit=2, windows=1, seq_len=32)
    assert [(s.task, s.metric) for s in scores] == [
        ("wikitext2_ppl", "perplexity"),
        ("wikitext2_lastword", "perplexity"),
        ("wikitext2_lastword", "acc"),
    ]
    lastword = scores[2]
    assert (lastword.examples, lastword.dataset, lastword.dataset_config) == (2, None, "wikitext2_lastword")
    assert "lm-evaluation-harness 0.4" in lastword.protocol and "2 of " in lastword.protocol
    assert "built offline from the Salesforce/wikitext wikitext-2-raw-v1 test split" in lastword.protocol
    assert "first 1 non-overlapping windows of 32 tokens" in scores[0].protocol


def test_unknown_tasks_are_refused_before_any_scoring(tiny, monkeypatch, capsys):
    """The harness's own index (15,000 YAML files, tens of seconds on shared cores) is left out here, so any
    name outside the local tasks is unknown; the refusal is the same with it."""
    from lm_eval.tasks import TaskManager

    build = TaskManager.__init__
    indexed_tasks.cache_clear()
    monkeypatch.setattr(TaskManager, "__init__", lambda self, **kw: build(self, **{**kw, "include_defaults": False}))
    model, tokenizer, folder = tiny
    with pytest.raises(UnknownTaskError, match=r"'no_such_task'.*--tasks.*wikitext2_lastword"):
        evaluate_tasks(model, tokenizer, ["wikitext2_lastword", "no_such_task"], limit=1)
    argv = ["eval", str(folder / "pruned"), "--tasks", "wikitext2_ppl,nope", "--baseline", "none"]
    assert main(argv) == 2
    assert re.search(r"unknown task 'nope'.*--tasks", " ".join(capsys.readouterr().err.split()))
    indexed_tasks.cache_clear()  # no index without the harness's tasks outlives the patch


def test_a_missing_harness_names_the_extra(tiny, monkeypatch):
    model, tokenizer, _ = tiny
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(MissingDependencyError, match=re.escape('pip install "hf_prune[eval]"')):
        evaluate_tasks(model, tokenizer, ["wikitext2_lastword"])


# --------------------------------------------------------------------------- the CLI and the card
def test_cli_eval_tasks_prints_one_table_writes_json_and_the_card_round_trips(tiny, capsys):
    _, _, folder = tiny
    pruned, dense = folder / "pruned", folder / "dense"
    original = ModelCard.load(pruned / "README.md").text
    common = ["eval", str(pruned), "--baseline", str(dense), "--limit", "2", "--windows", "1", "--seq-len", "32"]
    assert main([*common, "--tasks", "wikitext2_nextsentence", "--write-card"]) == 0
    capsys.readouterr()
    argv = [*common, "--tasks", "wikitext2_ppl,wikitext2_lastword", "--json", str(folder / "s.json"), "--write-card"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads((folder / "s.json").read_text())["scores"]
    assert [(row["task"], row["metric"]) for row in rows] == [
        ("wikitext2_ppl", "perplexity"),
        ("wikitext2_lastword", "perplexity"),
        ("wikitext2_lastword", "acc"),
    ]
    table = out.split("pruned/dense", 1)[1]
    for row in rows:
        assert row["ratio"] == pytest.approx(row["pruned"] / row["dense"]) if row["dense"] else row["ratio"] is None
        line = next(line for line in table.splitlines() if line.startswith(row["task"]) and row["metric"] in line)
        assert f"{row['dense']:,.4f}" in line and f"{row['pruned']:,.4f}" in line
    assert "--limit 2" in out
    card = ModelCard.load(pruned / "README.md")
    results = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    # Both runs' results, each the pruned value the JSON holds, with data set, split and protocol.
    assert {("WikiText-2 next sentence, 4 choices (hf_prune)", "acc"), ("WikiText-2", "perplexity")} <= set(results)
    for row in rows:
        result = results[(row["dataset_name"], row["metric"])]
        assert result.metric_value == row["pruned"]
        assert row["protocol"] in result.metric_name
        expected = (
            ("Salesforce/wikitext", "wikitext-2-raw-v1") if row["task"] == "wikitext2_ppl" else ("custom", row["task"])
        )
        assert (result.dataset_type, result.dataset_config, result.dataset_split) == (*expected, "test")
    assert card.data.datasets == ["Salesforce/wikitext"]
    # The card keeps what it said; one evaluation section (the second run replaced the first's).
    assert card.text.startswith(original.rstrip("\n"))
    assert card.text.count("## Evaluation with `hf-prune eval`") == 1
    assert "| wikitext2_lastword acc |" in card.text and "wikitext2_nextsentence" not in card.text
    # `hf-prune push --dry-run` lists them.
    assert main(["push", str(pruned), "someone/model", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{row['metric']} = {row['pruned']}" in listed for row in rows)


def test_cli_eval_tasks_refuses_bad_input_naming_the_argument(tiny, capsys):
    """(Unknown task names: test_unknown_tasks_are_refused_before_any_scoring.)"""
    _, _, folder = tiny
    pruned = str(folder / "pruned")
    cases = [
        (["eval", str(folder / "missing"), "--tasks", "wikitext2_ppl"], r"MODEL_FOLDER .*missing.* is not a folder"),
        (["eval", pruned, "--tasks", "wikitext2_ppl"], r"records no model it was pruned from.*--baseline DENSE"),
        (["eval", pruned, "--limit", "3"], r"--limit.*go with --tasks"),
        (["eval", pruned, "--tasks", "wikitext2_ppl", "--baseline", "none", "--write-card"], r"drop --baseline none"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert re.search(message, " ".join(capsys.readouterr().err.split())), argv


def test_the_default_baseline_is_the_model_the_card_records(smollm2, tmp_path):
    folder, _ = smollm2
    card = '---\nlibrary_name: transformers\n---\n\n```python\npruner = HFPruner.from_pretrained("{}")\n```\n'
    (tmp_path / "README.md").write_text(card.format(folder))
    assert recorded_source(tmp_path) == str(folder)
    assert pypi_checkpoint_at(recorded_source(tmp_path)) == "smollm2-135m-instruct"
    (tmp_path / "README.md").write_text(card.format("BASE_MODEL").replace("---\n\n", "base_model: org/dense\n---\n\n"))
    assert recorded_source(tmp_path) == "org/dense"


# --------------------------------------------------------------------------- the real SmolLM2
@pytest.mark.slow
def test_real_smollm2_dense_against_pruned_on_the_local_task(smollm2):
    """SmolLM2-135M-Instruct against a 25%-of-neurons magnitude prune, 16 last-word examples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, kwargs = smollm2
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    results = run_harness(model, tokenizer, ["wikitext2_lastword"], limit=16, log_samples=True)
    dense = results["results"]["wikitext2_lastword"]
    sample = results["samples"]["wikitext2_lastword"][0]
    # The harness encodes context + target whole and splits at the context's length (BPE merges across).
    whole = tokenizer(sample["doc"]["context"] + " " + sample["doc"]["target"]).input_ids
    context = tokenizer(sample["doc"]["context"]).input_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)[len(context) - 1 : -1]
    expected = logprobs[torch.arange(len(whole) - len(context)), torch.tensor(whole[len(context) :])].sum().item()
    assert sample["filtered_resps"][0][0] == pytest.approx(expected, abs=1e-3)
    assert dense["acc,none"] >= 0.2  # a real model completes some paragraphs; a random one none
    pruner = HFPruner(model, tokenizer=tokenizer)
    pruner.prune(mlp_neurons=0.25, criterion="magnitude", reconstruct="none")  # no calibration
    pruned = run_harness(pruner.model, tokenizer, ["wikitext2_lastword"], limit=16)["results"]["wikitext2_lastword"]
    assert pruned["perplexity,none"] > dense["perplexity,none"]
