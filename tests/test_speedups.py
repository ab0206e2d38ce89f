"""The shortcuts that make the default prune fast compute what the plain formulas compute."""

import pytest
import torch

from hf_prune.calibration.statistics import add_gram
from hf_prune.criteria import obs


@pytest.mark.parametrize("channels", [3, 64, 577])
def test_blocked_gram_equals_the_full_matmul(channels):
    x = torch.randn(300, channels, generator=torch.Generator().manual_seed(channels))
    gram = torch.zeros(channels, channels, dtype=torch.float64)
    add_gram(gram, x)
    add_gram(gram, x)
    torch.testing.assert_close(gram, 2 * (x.T @ x).double(), rtol=1e-6, atol=1e-4)
    assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("block", [1, 4])
def test_greedy_obs_on_compacted_matrices_scores_as_on_full_ones(monkeypatch, block):
    """Compacting W and G⁻¹ to the alive channels changes rounding only, not the order of removal."""
    generator = torch.Generator().manual_seed(block)
    x = torch.randn(400, 96, generator=generator, dtype=torch.float64) * torch.rand(96, generator=generator)
    weight = torch.randn(24, 96, generator=generator, dtype=torch.float64)
    blocks = list(torch.arange(96).split(block))
    compacted = obs.greedy_removal_scores(weight, x.T @ x, blocks, chunk=3)
    monkeypatch.setattr(obs, "COMPACT_AT", 0.0)  # never compact: every step updates the full matrices
    full = obs.greedy_removal_scores(weight, x.T @ x, blocks, chunk=3)
    assert torch.equal(compacted.argsort(), full.argsort())
    torch.testing.assert_close(compacted, full, rtol=1e-9, atol=0)
