"""Zero-shot pruning of the CIFAR-10 reference classifiers: accuracy, parameters, FLOPs, latency.

Each reference model (scripts/train_reference_vision.py) is measured dense, then pruned to
20%, 30% and 50% fewer parameters with every applicable criterion, with and without the
least-squares repair, and with `random`. One calibration pass (CIFAR-10 train images through the
model's image processor) serves every row of a model. Rows are written to JSON as they finish;
a rerun skips the rows already there (`--rows` filters by substring).

The budgets are fractions of *all* parameters (embeddings and classifier included), whereas
`PruningConfig(sparsity=...)` counts prunable parameters only; so the fraction is converted here
into per-kind amounts with the uniform allocation (vanilla-loadable): ViT removes the same share of
heads (whole heads, rounded) and fills the rest with MLP neurons; ResNet removes a fraction of
every block's inner channels. The achieved fraction is reported beside the target. Gradient
criteria (`taylor`, `fisher`) differentiate the cross-entropy against the dense model's own
predictions (`hf_prune.calibration.loss`); `synflow` needs no data.

On ResNet a second family of rows, `stage channels` (ids `resnet/stage/...`), removes the same
fraction of every stage's stream channels (tied across blocks by the residual additions) and of
every block's inner channels, which keeps a basic-block ResNet in the vanilla format; only the
criteria that rank stream channels (magnitude, activation, random) run there.

Two more families of rows, where their tools run:

- `torch-pruning/{magnitude,taylor}`: Torch-Pruning's MetaPruner at the same parameter fraction
  (`torch_pruning_baseline.prune_image_classifier`: every convolution's channels on ResNet, MLP
  neurons on ViT);
- `recovery/...`: one epoch of fine-tuning on the CIFAR-10 train split (random crops and flips) with
  `transformers.Trainer`: `oneshot+ft` starts from the best zero-shot row of that budget;
  `callback` (ViT) prunes gradually during the epoch with the `PruningCallback` (cubic schedule,
  Taylor scores of the training batches) and compacts at the end. Issue 18's variants: `oneshot+distill`
  (the one-shot row's epoch with distillation from the dense model, `DistillationCallback`),
  `callback/taylor+repair` (`repair="lstsq"`: the consumers refitted at every pruning event),
  `callback/taylor+distill` (`distill=Distillation(--distill-alpha, --distill-temperature)`) and
  `callback/taylor+both`. The callback does not prune convolution channels, so ResNet has the one-shot
  rows only.

Accuracy is on the local CIFAR-10 test split, quality-75 JPEGs: about 11 points below the
original test set. Every prune uses `--damping` (default: `PruningConfig`'s).

Results go to `--output` (JSON) with every setting that changes the numbers (results_file.py); a
rerun with the same settings skips the rows already there, other settings are refused. The table
covers the rows this command selects, below the command line that reproduces it.

    python scripts/benchmark_vision.py --eval-images 2000
"""

from __future__ import annotations

import argparse
import copy
import resource
import tempfile
import time
from pathlib import Path

import torch
import transformers
from results_file import open_results, package_versions
from train_reference_vision import augment, normalise

from hf_prune import Distillation, HFPruner, PruningCallback, PruningConfig
from hf_prune.allocation import plan_for
from hf_prune.calibration.images import JPEG_CAVEAT, calibration_pixels, cifar10, pixel_values
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.criteria.random import RandomCriterion
from hf_prune.errors import InvalidPruningTargetError
from hf_prune.evaluation import image_flops, latency_ms, parameter_count, top1_of_pixels
from hf_prune.groups import get_adapter
from hf_prune.training.recovery import DistillationCallback

MODELS = {
    "vit": "reference_models/cifar10-vit",
    "resnet": "reference_models/cifar10-resnet",
}
RATIOS = (0.2, 0.3, 0.5)
CRITERIA = ("magnitude", "activation", "fluctuation", "flow", "obs", "taylor", "fisher", "synflow", "random")
GRADIENT_CRITERIA = ("taylor", "fisher")
TORCH_PRUNING = ("magnitude", "taylor")
#: Fine-tuning learning rate of the recovery epoch (a quarter of the reference models' peak rate).
RECOVERY_LEARNING_RATE = 5e-4
REPAIRS = ("none", "lstsq")
#: Criteria that rank stream channels (`stage_channels`); the others refuse that kind.
STAGE_CRITERIA = ("magnitude", "activation", "random")


def removed_fraction(model, adapter, amounts: dict) -> float:
    plan = plan_for(model, adapter, PruningConfig(**amounts), RandomCriterion())
    return plan.removed_parameter_count(model, adapter) / parameter_count(model)


def amounts_for(model, adapter, ratio: float, stage: bool = False) -> dict:
    """Per-kind amounts (uniform allocation) whose removed parameters come closest to `ratio`
    (`stage`: the same fraction of stream channels and inner channels)."""
    fractions = [k / 200 for k in range(1, 199)]
    if stage:
        candidates = [{"stage_channels": f, "channels": f} for f in fractions]
    elif "channels" in adapter.kinds:
        candidates = [{"channels": f} for f in fractions]
    else:
        layer = adapter.layers(model)[0]
        heads = adapter.geometry(layer).attention.num_heads
        # The same share of heads as of neurons would give, rounded to whole heads.
        equal = ratio * parameter_count(model) / sum(p.numel() for p in adapter.layers(model).parameters())
        count = min(heads - 1, round(equal * heads))
        candidates = [{"attention_heads": count, "mlp_neurons": f} if count else {"mlp_neurons": f} for f in fractions]
    best, error = None, float("inf")
    for amounts in candidates:
        try:
            achieved = removed_fraction(model, adapter, amounts)
        except InvalidPruningTargetError:  # rounds to nothing or to everything in some layer
            continue
        if abs(achieved - ratio) < error:
            best, error = amounts, abs(achieved - ratio)
    return best


def measure(model, test_pixels, labels, latency_batch) -> dict:
    return {
        "top1": top1_of_pixels(model, test_pixels, labels),
        "parameters": parameter_count(model),
        "flops": image_flops(model, test_pixels),
        "latency_ms": latency_ms(model, {"pixel_values": latency_batch}),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


class ImageBatches:
    """Trainer collator: indices into the uint8 training images → augmented, normalised pixel values
    and labels (the reference models' own training augmentation)."""

    def __init__(self, images, size: int, seed: int):
        self.images, self.size = images, size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(indices)
        pixels = normalise(augment(self.images.images[index], self.generator), self.size)
        return {"pixel_values": pixels, "labels": self.images.labels[index]}


def recovery_epoch(model, train, processor, callback: PruningCallback | None = None, seed: int = 0):
    """One epoch of fine-tuning with `transformers.Trainer` (AdamW, cosine decay); returns the model
    the Trainer ends with (the compacted one when a `PruningCallback` prunes during the epoch)."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir,
            num_train_epochs=1,
            per_device_train_batch_size=128,
            learning_rate=RECOVERY_LEARNING_RATE,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            weight_decay=0.05,
            save_strategy="no",
            report_to=[],
            logging_steps=100,
            use_cpu=True,
            seed=seed,
            remove_unused_columns=False,
            dataloader_drop_last=True,
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=list(range(len(train))),
            data_collator=ImageBatches(train, processor.size["height"], seed),
            callbacks=[callback] if callback else None,
        )
        trainer.train()
        return trainer.model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="override a model folder",
    )
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument(
        "--eval-images",
        type=int,
        default=10_000,
        help="test images, every k-th (class-balanced)",
    )
    parser.add_argument("--num-samples", type=int, default=256, help="calibration images")
    parser.add_argument("--rows", help="only rows whose id contains this")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_vision.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--damping", type=float, default=PruningConfig.damping, help="every prune's ridge")
    parser.add_argument(
        "--recovery-ratios",
        nargs="*",
        type=float,
        default=[0.3, 0.5],
        help="budgets that get the one-epoch recovery rows (none: skip them)",
    )
    parser.add_argument("--train-images", type=int, default=50_000, help="images of the recovery epoch")
    parser.add_argument("--distill-alpha", type=float, default=0.5, help="α of the distillation rows")
    parser.add_argument("--distill-temperature", type=float, default=1.0, help="T of the distillation rows")
    parser.add_argument(
        "--torch-pruning",
        nargs="*",
        default=list(TORCH_PRUNING),
        choices=list(TORCH_PRUNING),
        help="Torch-Pruning importances to compare (none: skip)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = {**MODELS, **dict(item.split("=", 1) for item in args.model_dir)}
    test, train = cifar10("test"), None
    chosen = torch.arange(0, len(test), max(1, len(test) // args.eval_images))[: args.eval_images]
    settings = {
        "models": folders,
        "test": "cifar10 test split (quality-75 JPEGs), every k-th image",
        "eval_images": len(chosen),  # evaluated
        "num_samples": args.num_samples,
        "calibration": "cifar10 train, seed 0",
        "damping": args.damping,
        "train_images": args.train_images,
        "recovery": f"1 epoch, batch 128, AdamW lr {RECOVERY_LEARNING_RATE} cosine, seed 0",
        "distillation": f"alpha {args.distill_alpha}, T {args.distill_temperature}, teacher: the dense model",
        "latency": "median of 5 forward passes, batch 64",
        "threads": args.threads,
    }
    results = open_results(args.output, settings, __file__, argv, parser)
    results.info["caveat"] = JPEG_CAVEAT
    rows = results.rows
    selected: list[str] = []  # the rows this command asks for, in order: the table's rows

    def wanted(row_id: str) -> bool:
        """Whether `row_id` is one of this command's rows and still to measure."""
        if args.rows and args.rows not in row_id:
            return False
        selected.append(row_id)
        return row_id not in rows

    for name in args.models:
        dense = transformers.AutoModelForImageClassification.from_pretrained(folders[name], dtype=torch.float32).eval()
        processor = transformers.AutoImageProcessor.from_pretrained(folders[name])
        adapter = get_adapter(dense.config)
        test_pixels = pixel_values(test.images[chosen], processor)
        labels = test.labels[chosen]
        latency_batch = test_pixels[:64]
        plans = [("dense", None, None, None, False)] + [
            (f"{criterion}/{repair}/{ratio}", criterion, repair, ratio, False)
            for ratio in args.ratios
            for criterion in args.criteria
            for repair in REPAIRS
        ]
        if "stage_channels" in adapter.kinds:
            plans += [
                (f"stage/{criterion}/{repair}/{ratio}", criterion, repair, ratio, True)
                for ratio in args.ratios
                for criterion in args.criteria
                if criterion in STAGE_CRITERIA
                for repair in REPAIRS
            ]
        statistics = None  # one statistics pass per model, on the first pruned row
        calibration = calibration_pixels("cifar10", processor, args.num_samples, seed=0)
        amounts_of: dict[tuple[float, bool], dict] = {}  # (ratio, stage) → amounts: one search each
        for key, criterion, repair, ratio, stage in plans:
            row_id = f"{name}/{key}"
            if not wanted(row_id):
                continue
            if criterion is None:
                row = {"id": row_id, "model": name, "criterion": "dense"}
                results.save_row(row_id, {**row, **measure(dense, test_pixels, labels, latency_batch)})
                continue
            if statistics is None:
                requirements = {"moments", "mlp_gram"}
                if "stage_channels" in adapter.kinds:
                    requirements.add("stream_gram")
                if set(GRADIENT_CRITERIA) & set(args.criteria):
                    requirements.add("gradients")
                statistics = collect_statistics(dense, adapter, calibration.split(32), requirements)
            if (ratio, stage) not in amounts_of:
                amounts_of[(ratio, stage)] = amounts_for(dense, adapter, ratio, stage)
            amounts = amounts_of[(ratio, stage)]
            pruner = HFPruner(copy.deepcopy(dense), processor=processor)
            start = time.perf_counter()
            report = pruner.prune(
                PruningConfig(
                    **amounts,
                    criterion=criterion,
                    reconstruct=repair,
                    calibration="cifar10",
                    damping=args.damping,
                ),
                statistics=statistics,
            )
            seconds = time.perf_counter() - start
            result = measure(pruner.model.eval(), test_pixels, labels, latency_batch)
            row = {
                "id": row_id,
                "model": name,
                "criterion": criterion,
                "units": "stage channels" if stage else "inner",
                "repair": repair,
                "target": ratio,
                "amounts": amounts,
                "removed": 1 - report.parameters_after / report.parameters_before,
                "prune_seconds": seconds,
                "format": report.output_format,
                **result,
            }
            results.save_row(row_id, row)
            print(f"{row_id}: top-1 {result['top1']:.4f}", flush=True)

        for ratio in args.ratios:
            for importance in args.torch_pruning:
                row_id = f"{name}/torch-pruning/{importance}/{ratio}"
                if not wanted(row_id):
                    continue
                row = {
                    "id": row_id,
                    "model": name,
                    "criterion": f"torch-pruning/{importance}",
                    "units": "torch-pruning",
                    "target": ratio,
                    "torch_pruning_version": package_versions(("torch-pruning",))["torch-pruning"],
                }
                from torch_pruning_baseline import prune_image_classifier  # needs the [bench] extra

                start = time.perf_counter()
                try:
                    pruned, removed = prune_image_classifier(dense, adapter, ratio, importance, calibration)
                except ValueError as error:
                    results.save_row(row_id, {**row, "error": str(error)})
                else:
                    seconds = time.perf_counter() - start
                    result = measure(pruned.eval(), test_pixels, labels, latency_batch)
                    results.save_row(row_id, {**row, "removed": removed, "prune_seconds": seconds, **result})
                print(f"{row_id}: {rows[row_id].get('top1', rows[row_id].get('error'))}", flush=True)

        for ratio in args.recovery_ratios:
            zero_shot = [
                row
                for row in rows.values()
                if row["model"] == name and row.get("units") == "inner" and row.get("target") == ratio
            ]
            if not zero_shot:
                continue
            best = max(zero_shot, key=lambda row: row["top1"])
            zero_shot_row = f"{best['criterion']}+{best['repair']}"
            distill = Distillation(alpha=args.distill_alpha, temperature=args.distill_temperature)
            # name -> (the PruningCallback, or None for the one-shot prune; distil from the dense model)
            recoveries = {
                f"oneshot+ft/{zero_shot_row}": (None, False),
                f"oneshot+distill/{zero_shot_row}": (None, True),
            }
            if "channels" not in adapter.kinds:  # the callback prunes heads and neurons, not channels
                for suffix, options in {
                    "": {},
                    "+repair": {"repair": "lstsq"},
                    "+distill": {"distill": distill},
                    "+both": {"repair": "lstsq", "distill": distill},
                }.items():
                    recoveries[f"callback/taylor{suffix}"] = (
                        PruningCallback(
                            PruningConfig(**best["amounts"], damping=args.damping),
                            score="taylor",
                            pruned_dir=None,
                            **options,
                        ),
                        False,
                    )
            for recovery, (callback, distilled) in recoveries.items():
                row_id = f"{name}/recovery/{recovery}/{ratio}"
                if not wanted(row_id):
                    continue
                if train is None:
                    train = cifar10("train")
                    train = type(train)(
                        train.images[: args.train_images], train.labels[: args.train_images], train.classes
                    )
                start = time.perf_counter()
                if callback is None:
                    pruner = HFPruner(copy.deepcopy(dense), processor=processor)
                    pruner.prune(
                        PruningConfig(
                            **best["amounts"],
                            criterion=best["criterion"],
                            reconstruct=best["repair"],
                            calibration="cifar10",
                            damping=args.damping,
                        ),
                        statistics=statistics,
                    )
                    teacher = (
                        DistillationCallback(copy.deepcopy(dense), args.distill_alpha, args.distill_temperature)
                        if distilled
                        else None
                    )
                    model = recovery_epoch(pruner.model.train(), train, processor, teacher)
                else:
                    model = recovery_epoch(copy.deepcopy(dense).train(), train, processor, callback)
                seconds = time.perf_counter() - start
                result = measure(model, test_pixels, labels, latency_batch)
                row = {
                    "id": row_id,
                    "model": name,
                    "criterion": recovery,
                    "units": "recovery",
                    "repair": best["repair"] if callback is None else "-",
                    "target": ratio,
                    "amounts": best["amounts"],
                    "removed": 1 - result["parameters"] / parameter_count(dense),
                    "prune_seconds": seconds,
                    **result,
                }
                results.save_row(row_id, row)
                print(f"{row_id}: top-1 {result['top1']:.4f}", flush=True)

    results.report(table([rows[row_id] for row_id in selected], rows, results.settings))
    return results.as_dict()


def table(rows: list[dict], every_row: dict, settings: dict) -> str:
    """One line per row of `rows` (top-1 relative to its model's dense row in `every_row`), under the
    evaluation's caveat."""
    lines = [
        f"{JPEG_CAVEAT}\nTest images: {settings['eval_images']}; "
        f"calibration: {settings['num_samples']} CIFAR-10 train images; damping {settings['damping']}.",
        f"{'model':<7}{'units':<15}{'criterion':<28}{'repair':<7}{'target':>7}{'removed':>8}{'top-1':>7}"
        f"{'vs dense':>9}{'params':>9}{'MFLOPs':>8}{'ms/64':>7}",
    ]
    dense_top1 = {row["model"]: row["top1"] for row in every_row.values() if row["criterion"] == "dense"}
    for row in rows:
        if "error" in row:
            model, units, criterion = row["model"], row["units"], row["criterion"]
            lines.append(f"{model:<7}{units:<15}{criterion:<28} {row['target']:.2f}: {row['error']}")
            continue
        relative = row["top1"] / dense_top1[row["model"]] if dense_top1.get(row["model"]) else float("nan")
        lines.append(
            f"{row['model']:<7}{row.get('units', '-'):<15}{row['criterion']:<28}{row.get('repair', '-'):<7}"
            f"{row.get('target', 0):>7.2f}{row.get('removed', 0):>8.3f}{row['top1']:>7.4f}{relative:>9.3f}"
            f"{row['parameters']:>9,}{row['flops'] / 1e6:>8.1f}{row['latency_ms']:>7.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
