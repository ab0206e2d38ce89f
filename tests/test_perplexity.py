"""hf_prune.evaluation.perplexity over all windows (`max_windows=None`) or the first N, against a plain loop."""

import math

import pytest
import torch
from tiny_models import FAMILIES

from hf_prune.evaluation import perplexity


@torch.no_grad()
def reference(model, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    total, count = 0.0, 0
    for index in range(windows):
        window = ids[index * seq_len : (index + 1) * seq_len]
        log_probs = torch.log_softmax(model(window[None]).logits[0, :-1].double(), -1)
        total -= log_probs.gather(1, window[1:, None]).sum().item()
        count += seq_len - 1
    return math.exp(total / count)


@pytest.mark.parametrize(("max_windows", "expected_windows"), [(None, 5), (2, 2), (50, 5)])
def test_perplexity_windows(one_thread, max_windows, expected_windows):
    model = FAMILIES["llama"].build().eval()
    ids = torch.randint(0, model.config.vocab_size, (5 * 16 + 7,), generator=torch.Generator().manual_seed(0))
    value = perplexity(model, ids, seq_len=16, max_windows=max_windows, batch_size=2)
    assert value == pytest.approx(reference(model, ids, 16, expected_windows), rel=1e-5)
