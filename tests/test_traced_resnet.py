"""Traced channel pruning of the real CIFAR-10 ResNet-20 and ResNet-56 (tests/cifar_resnet.py):
the option-A shortcut's channel padding keeps the residual streams, the blocks' inner channels are
cut, and the cut network's logits equal the masked network's."""

from __future__ import annotations

import copy

import pytest
import torch
from cifar_resnet import CHECKPOINTS, DEPTHS, MEAN, STD, load_cifar_resnet, models_dir
from conftest import require

from hf_prune import HFPruner, PruningConfig
from hf_prune.tracing.pruner import mask_groups


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def resnet(request):
    if not (models_dir() / CHECKPOINTS[request.param]).is_file():
        require(f"{models_dir() / CHECKPOINTS[request.param]} is missing (see ../shared/README.md)")
    return request.param, load_cifar_resnet(request.param)


def images(count: int = 8) -> torch.Tensor:
    pixels = torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_resnet_30_percent_channels_cut_equals_masked(resnet, one_thread):
    name, model = resnet
    dense = copy.deepcopy(model)
    pruner = HFPruner.from_model(model, example_inputs=images(1))
    blocks = 3 * DEPTHS[name]
    # only each block's inner channels are free: the padded shortcuts fix the residual widths
    assert [family.name for family in pruner.traced.families] == [
        f"layer{stage}.{block}.conv1" for stage in (1, 2, 3) for block in range(DEPTHS[name])
    ]
    reasons = {blocked.reason for blocked in pruner.traced.blocked}
    assert any(r.startswith("pad in layer2.0.shortcut") for r in reasons)
    assert pruner.traced.blocked_channels == 16 * (1 + DEPTHS[name]) + 32 * DEPTHS[name] + 64 * DEPTHS[name] + 10
    report = pruner.prune(PruningConfig(channels=0.3, criterion="magnitude"))
    assert len(pruner.removed) == DEPTHS[name] * (5 + 10 + 19)
    assert 0.28 < 1 - report.parameters_after / report.parameters_before < 0.32
    assert sum(1 for m in pruner.model.modules() if isinstance(m, torch.nn.Conv2d)) == 1 + 2 * blocks
    mask_groups(dense, pruner.removed)
    with torch.no_grad():
        torch.testing.assert_close(pruner.model(images()), dense(images()), rtol=1e-4, atol=1e-4)
