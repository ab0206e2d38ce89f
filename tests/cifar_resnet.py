"""The CIFAR-10 ResNet-20/56 of `../shared/models/cifar10-resnet/` (He et al. 2016, option A), as
described in `../shared/README.md`: 3×3 convolutions without bias, BatchNorm, three stages of 16, 32
and 64 channels, and identity shortcuts that, where a stage halves the resolution, subsample and
zero-pad the channels (a parameter-free shortcut fixed in code: the tracer must refuse to prune
the channels it touches). Plain PyTorch, the generic (non-HF) path's real trained CNN."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
DEPTHS = {"resnet20": 3, "resnet56": 9}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def models_dir() -> Path:
    data = Path(os.environ.get("HF_PRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return data.parent / "models" / "cifar10-resnet"


class PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad `planes // 4` channels on each side."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def load_cifar_resnet(name: str) -> CifarResNet:
    """The trained network (its checkpoint: a state dict prefixed `module.`, saved from CUDA)."""
    checkpoint = torch.load(models_dir() / CHECKPOINTS[name], map_location="cpu", weights_only=True)
    model = CifarResNet(DEPTHS[name])
    state = {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not key.endswith("num_batches_tracked") for key in missing):
        raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()
