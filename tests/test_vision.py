"""Image calibration and evaluation: CIFAR-10 and image folders through the image processor,
top-1 accuracy, the data errors, and which group kinds each family accepts."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import require
from tiny_models import FAMILIES, STRUCTURAL
from transformers import ViTImageProcessor

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.images import ImageSet, cifar10, image_set
from hf_prune.errors import DataNotFoundError, InvalidPruningTargetError
from hf_prune.evaluation import top1_accuracy

PROCESSOR = ViTImageProcessor(size={"height": 16, "width": 16})


def write_image_folder(root, per_class: int = 3) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(root / name / f"{index}.png")


def test_image_folder_calibration(tmp_path, one_thread):
    write_image_folder(tmp_path / "images")
    images = image_set(tmp_path / "images")
    assert images.classes == ("cat", "dog") and images.images.shape == (6, 3, 8, 8)
    assert images.labels.tolist() == [0, 0, 0, 1, 1, 1]
    pruner = HFPruner(FAMILIES["vit"].build(), processor=PROCESSOR)
    report = pruner.prune(
        mlp_neurons=0.25,
        criterion="activation",
        calibration=str(tmp_path / "images"),
        num_samples=4,
    )
    assert report.calibration["windows"] == 4
    assert report.parameters_after < report.parameters_before


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_gradient_criteria_score_images_against_own_predictions(tmp_path, one_thread, criterion):
    """Unlabelled image folders calibrate gradient criteria: the loss is the cross-entropy against
    the model's top-1 predictions."""
    write_image_folder(tmp_path / "images")
    model = FAMILIES["vit"].build()
    width = model.config.intermediate_size
    pruner = HFPruner(model, processor=PROCESSOR)
    report = pruner.prune(
        mlp_neurons=0.5,
        criterion=criterion,
        calibration=str(tmp_path / "images"),
        num_samples=6,
        batch_size=3,
    )
    assert report.parameters_after < report.parameters_before
    assert pruner.model.config.intermediate_size == width // 2


def test_synflow_ranks_resnet_channels():
    """SynFlow is data-free: an all-ones image flows through a convolutional model whose config
    names no input size, and its blocks live in several stages' lists."""
    pruner = HFPruner(FAMILIES["resnet"].build(), processor=PROCESSOR)
    report = pruner.prune(channels=0.25, criterion="synflow", reconstruct="none")
    assert report.parameters_after < report.parameters_before


def test_loss_criterion_on_images_is_the_change_against_dense_predictions(tmp_path, one_thread):
    from hf_prune.calibration.images import calibration_pixels
    from hf_prune.calibration.loss import calibration_loss, dense_predictions
    from hf_prune.criteria import get_criterion
    from hf_prune.criteria.base import ScoringContext
    from hf_prune.groups import get_adapter
    from hf_prune.masking import apply_masks
    from hf_prune.plan import PruningPlan

    write_image_folder(tmp_path / "images")
    model = FAMILIES["vit"].build().eval()
    adapter = get_adapter(model.config)
    pixels = calibration_pixels(str(tmp_path / "images"), PROCESSOR, 6)
    context = ScoringContext(model, adapter, windows=pixels, batch_size=6)
    groups = [
        group for index, layer in enumerate(adapter.layers(model)) for group in adapter.groups(layer, index, "layers")
    ]
    scores = get_criterion("loss").score(context, groups)
    targets = dense_predictions(model, {"pixel_values": pixels})
    dense = calibration_loss(model, {"pixel_values": pixels}, targets).item()
    plan = PruningPlan.keep_all(model, adapter)
    plan.layers[1].keep_layer = False
    handles = apply_masks(model, adapter, plan)
    with torch.no_grad():
        without_layer_1 = calibration_loss(model, {"pixel_values": pixels}, targets).item()
    for handle in handles:
        handle.remove()
    assert scores[1].item() == pytest.approx(without_layer_1 - dense, rel=1e-5, abs=1e-6)


def test_cifar10_calibration(one_thread):
    if not os.environ.get("HF_PRUNE_DATA_DIR"):
        require("CIFAR-10 needs HF_PRUNE_DATA_DIR (../shared/data)")
    test = cifar10("test")
    assert len(test) == 10_000 and test.images.dtype == torch.uint8 and test.images.shape[1:] == (3, 32, 32)
    assert test.labels.bincount().tolist() == [1000] * 10
    pruner = HFPruner(FAMILIES["resnet"].build(), processor=PROCESSOR)
    report = pruner.prune(channels=0.25, calibration="cifar10", num_samples=16, batch_size=8)
    assert report.calibration["windows"] == 16


def test_missing_cifar10_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PRUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError, match="cifar10-jpg.tar.gz is missing"):
        cifar10("test")
    with pytest.raises(DataNotFoundError, match="neither 'cifar10' nor an image folder"):
        image_set(tmp_path / "nowhere")
    pruner = HFPruner(FAMILIES["vit"].build(), processor=PROCESSOR)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="holds no images"):
        pruner.prune(
            mlp_neurons=0.25,
            criterion="activation",
            calibration=str(tmp_path / "empty"),
        )


def test_top1_accuracy_counts_correct_labels(one_thread):
    model = FAMILIES["vit"].build()
    images = torch.randint(
        0,
        256,
        (10, 3, 16, 16),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        predicted = model(
            pixel_values=PROCESSOR(images=list(images), return_tensors="pt")["pixel_values"]
        ).logits.argmax(-1)
    assert top1_accuracy(model, ImageSet(images, predicted, ()), PROCESSOR, batch_size=4) == 1.0
    wrong = (predicted + 1) % 10
    wrong[:3] = predicted[:3]
    assert top1_accuracy(model, ImageSet(images, wrong, ()), PROCESSOR, batch_size=4) == 0.3


def test_group_kinds_each_family_accepts():
    with pytest.raises(InvalidPruningTargetError, match="channels=0.25.*cannot prune channels"):
        HFPruner(FAMILIES["llama"].build()).prune(channels=0.25, **STRUCTURAL)
    with pytest.raises(InvalidPruningTargetError, match="mlp_neurons=0.25.*use channels"):
        HFPruner(FAMILIES["resnet"].build()).prune(mlp_neurons=0.25, **STRUCTURAL)
    with pytest.raises(InvalidPruningTargetError, match="channels=0.99 removes all"):
        HFPruner(FAMILIES["resnet"].build()).prune(channels=0.99, **STRUCTURAL)
    assert "channels" in PruningConfig(channels=0.3).to_dict()


def test_cli_eval_reports_cifar10_top1(tmp_path, capsys, one_thread):
    if not os.environ.get("HF_PRUNE_DATA_DIR"):
        require("CIFAR-10 needs HF_PRUNE_DATA_DIR (../shared/data)")
    from hf_prune.cli import main

    pruner = HFPruner(FAMILIES["vit"].build(), processor=PROCESSOR)
    pruner.prune(mlp_neurons=1, attention_branches=1, **STRUCTURAL)  # the loader format
    pruner.save_pretrained(tmp_path / "vit")
    assert main(["eval", str(tmp_path / "vit")]) == 0
    output = capsys.readouterr().out
    assert "CIFAR-10 top-1" in output and "quality-75 JPEG" in output
