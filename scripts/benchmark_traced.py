"""Traced channel pruning of the real CIFAR-10 ResNet-20 and ResNet-56 (no adapter: hf_prune.tracing).

Rows: dense; 30% of the prunable output channels removed zero-shot with each criterion; and the
same after BatchNorm recalibration (running statistics re-estimated on calibration images, no
weight changes). Top-1 on the CIFAR-10 **JPEG** test split of ../shared/data/cifar10 (JPEG quality
75: these checkpoints score ~81%/83% there instead of 92%/93% on the original images); calibration
images come from the JPEG train split. Inputs normalised with mean (0.485, 0.456, 0.406), std
(0.229, 0.224, 0.225). The architecture is tests/cifar_resnet.py (option-A shortcuts).

The tarball is extracted once into --cache (outside the repository). Resumable: finished rows are
kept in the JSON file with every setting that changes the numbers (results_file.py) and skipped on
the next run with the same settings (other settings are refused); `--rows` filters by substring of
the row name. The table covers this command's rows, below the command line that reproduces it.

    python scripts/benchmark_traced.py --output outputs/benchmark_traced.json
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import resource
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results_file import open_results
from torch import nn
from tqdm import tqdm

from hf_prune import HFPruner, PruningConfig
from hf_prune.evaluation import parameter_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference architecture
from cifar_resnet import CHECKPOINTS, MEAN, STD, load_cifar_resnet

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CRITERIA = ("magnitude", "activation", "random")
JPEG_CAVEAT = "CIFAR-10 JPEG (quality 75) test split: lower than the original images' accuracy"


def extracted_cifar10(cache: Path) -> Path:
    """The imagefolder tree of the JPEG tarball, extracted once into `cache`."""
    folder = cache / "cifar10-jpg"
    if (folder / "test" / "truck").is_dir() and (folder / "train" / "truck").is_dir():
        return folder
    data_dir = Path(os.environ.get("HF_PRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    staging = cache / "cifar10-jpg.partial"
    staging.mkdir(parents=True, exist_ok=True)
    with tarfile.open(data_dir / "cifar10" / "cifar10-jpg.tar.gz") as archive:
        archive.extractall(staging, filter="data")
    staging.rename(folder)
    return folder


def load_images(
    folder: Path, split: str, per_class: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, 3, 32, 32) and labels of one split (`per_class` sampled per class)."""
    paths, labels = [], []
    for label, name in enumerate(CLASSES):
        files = sorted((folder / split / name).glob("*.jpg"))
        if per_class is not None:
            files = random.Random(seed + label).sample(files, per_class)
        paths += files
        labels += [label] * len(files)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in tqdm(paths, desc=f"reading {split}")])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    images = (images - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return images, torch.tensor(labels)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(
        (model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    return correct / len(images)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, images: torch.Tensor, batch: int = 100) -> None:
    """Re-estimate every BatchNorm's running mean and variance on `images` (a cumulative average)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    for i in range(0, len(images), batch):
        model(images[i : i + batch])
    model.eval()


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_traced.json"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "hf_prune")
    parser.add_argument("--channels", type=float, default=0.3)
    parser.add_argument("--calibration-per-class", type=int, default=100, help="train images per class")
    parser.add_argument(
        "--test-limit",
        type=int,
        default=None,
        help="evaluate on the first N test images",
    )
    parser.add_argument("--rows", default="", help="only rows whose name contains this")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    folder = extracted_cifar10(args.cache)
    test_images, test_labels = load_images(folder, "test")
    if args.test_limit:
        order = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))[: args.test_limit]
        test_images, test_labels = test_images[order], test_labels[order]
    calibration, _ = load_images(folder, "train", per_class=args.calibration_per_class)
    protocol = {
        "test_images": len(test_images),
        "test_subset": f"first {args.test_limit} of a seed-0 permutation" if args.test_limit else "all",
        "calibration_images": len(calibration),
        "calibration": "train split, seed 0 per class",
        "channels": args.channels,
        "data": JPEG_CAVEAT,
        "threads": args.threads,
    }
    results = open_results(args.output, protocol, __file__, argv, parser)
    save = results.save_row

    def row_names(model_name: str) -> list[str]:
        return [f"{model_name}/dense"] + [f"{model_name}/{c}/{s}" for c in CRITERIA for s in ("zero-shot", "bn-recal")]

    selected = [name for model_name in sorted(CHECKPOINTS) for name in row_names(model_name) if args.rows in name]
    for model_name in sorted(CHECKPOINTS):
        if all(r in results or args.rows not in r for r in row_names(model_name)):
            continue
        dense = load_cifar_resnet(model_name)
        if f"{model_name}/dense" not in results and args.rows in f"{model_name}/dense":
            start = time.perf_counter()
            dense_accuracy = accuracy(dense, test_images, test_labels)
            row = {"accuracy": dense_accuracy, "parameters": parameter_count(dense)}
            save(
                f"{model_name}/dense",
                {
                    **row,
                    "seconds": time.perf_counter() - start,
                    "peak_memory_mb": peak_memory_mb(),
                },
            )
        for criterion in CRITERIA:
            names = [
                f"{model_name}/{criterion}/zero-shot",
                f"{model_name}/{criterion}/bn-recal",
            ]
            if all(n in results or args.rows not in n for n in names):
                continue
            start = time.perf_counter()
            pruner = HFPruner.from_model(copy.deepcopy(dense), example_inputs=test_images[:1])
            report = pruner.prune(
                PruningConfig(
                    channels=args.channels,
                    criterion=criterion,
                    calibration=calibration.split(100),
                )
            )
            prune_seconds = time.perf_counter() - start
            common = {
                "parameters": report.parameters_after,
                "parameters_removed": 1 - report.parameters_after / report.parameters_before,
                "channels_removed": 1 - report.channels_after / report.channels_before,
                "prune_seconds": prune_seconds,
                "cut_vs_masked": report.max_abs_difference,
            }
            start = time.perf_counter()
            zero_shot = accuracy(pruner.model, test_images, test_labels)
            seconds = time.perf_counter() - start
            save(
                names[0],
                {
                    "accuracy": zero_shot,
                    **common,
                    "seconds": seconds,
                    "peak_memory_mb": peak_memory_mb(),
                },
            )
            start = time.perf_counter()
            recalibrate_batch_norm(pruner.model, calibration)
            recalibrated = accuracy(pruner.model, test_images, test_labels)
            seconds = time.perf_counter() - start
            save(
                names[1],
                {
                    "accuracy": recalibrated,
                    **common,
                    "seconds": seconds,
                    "peak_memory_mb": peak_memory_mb(),
                },
            )

    lines = [
        f"{JPEG_CAVEAT}; {protocol['test_images']} test images, {protocol['calibration_images']} calibration images",
        f"{'row':<32}{'top-1':>8}{'params':>10}{'-params':>9}{'prune s':>9}{'eval s':>8}{'peak MB':>9}",
    ]
    for name in selected:
        row = results.rows[name]
        removed = f"{100 * row['parameters_removed']:.1f}%" if "parameters_removed" in row else "–"
        prune = f"{row['prune_seconds']:.1f}" if "prune_seconds" in row else "–"
        lines.append(
            f"{name:<32}{100 * row['accuracy']:>7.2f}%{row['parameters']:>10,}{removed:>9}{prune:>9}"
            f"{row['seconds']:>8.1f}{row['peak_memory_mb']:>9.0f}"
        )
    results.report("\n".join(lines))
    return results.as_dict()


if __name__ == "__main__":
    main()
