"""Quality of the defaults on the real SmolLM2-135M (slow: `make test-slow`; the full table is
scripts/benchmark_zero_shot.py). Ratios are perplexity / dense perplexity on the first 16
WikiText-2 test windows, with margins over what the benchmark measured."""

import copy

import pytest

from hf_prune import HFPruner
from hf_prune.calibration.data import wikitext2_test_text
from hf_prune.evaluation import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense(smollm2):
    folder, kwargs = smollm2
    pruner = HFPruner.from_pretrained(folder, **kwargs)
    ids = pruner.tokenizer(wikitext2_test_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return pruner, ids, perplexity(pruner.model, ids, max_windows=16)


@pytest.mark.parametrize(
    "amounts, at_most",
    [({"mlp_neurons": 0.25}, 1.6), ({"kv_groups": 1}, 1.6)],
)
def test_default_criteria_and_repair_keep_perplexity_close(dense, amounts, at_most):
    pruner, ids, dense_perplexity = dense
    pruned = HFPruner(copy.deepcopy(pruner.model), tokenizer=pruner.tokenizer)
    pruned.prune(**amounts, num_samples=64)
    assert perplexity(pruned.model, ids, max_windows=16) / dense_perplexity <= at_most


def test_defaults_beat_magnitude_and_random(dense):
    pruner, ids, _ = dense
    results = {}
    for name, options in {
        "default": {},
        "magnitude": {"criterion": "magnitude", "reconstruct": "none"},
        "random": {"criterion": "random", "reconstruct": "none"},
    }.items():
        pruned = HFPruner(copy.deepcopy(pruner.model), tokenizer=pruner.tokenizer)
        pruned.prune(mlp_neurons=0.5, num_samples=64, **options)
        results[name] = perplexity(pruned.model, ids, max_windows=16)
    assert results["default"] < results["random"] and results["default"] < results["magnitude"]
