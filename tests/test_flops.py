"""`flops_per_token`: the analytic count the model card quotes, checked by hand on tiny models."""

import pytest
from tiny_models import FAMILIES, STRUCTURAL

from hf_prune import HFPruner
from hf_prune.evaluation import flops_per_token


def test_llama_by_hand():
    # hidden 96, 6 query heads and 3 KV heads of 16, gated MLP of 48, 4 layers, vocab 97, untied head.
    projections = 96 * 96 + 2 * 96 * 48 + 96 * 96 + 3 * 96 * 48
    attention = 2 * 6 * 16 * 8
    assert flops_per_token(FAMILIES["llama"].build(), context=8) == 2 * (4 * (projections + attention) + 96 * 97)


@pytest.mark.parametrize(
    "family, kwargs, saved_per_layer",
    [
        ("llama", {"mlp_neurons": 12}, 3 * 96 * 12),  # gate, up and down lose 12 rows / columns each
        ("phi3", {"mlp_neurons": 12}, 3 * 96 * 12),  # the same through the fused gate_up_proj
        ("gpt2", {"attention_heads": 1}, 4 * 64 * 16 + 2 * 16 * 8),  # q, k, v, o lose a head; QKᵀ and AV too
    ],
)
def test_pruning_removes_exactly_the_cut_multiply_adds(family, kwargs, saved_per_layer):
    pruner = HFPruner(FAMILIES[family].build())
    before = flops_per_token(pruner.model, context=8)
    pruner.prune(**kwargs, **STRUCTURAL)
    assert before - flops_per_token(pruner.model, context=8) == 2 * 4 * saved_per_layer
