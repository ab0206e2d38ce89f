"""Train the small CIFAR-10 reference classifiers on CPU: a ViT and a ResNet adapted to 32×32 inputs.

No pretrained Hugging Face vision checkpoint is reachable here, so the vision benchmark prunes
these. Data: the local quality-75 JPEG copy of CIFAR-10 (train split for training, test split for
the accuracy printed per epoch), decoded once into a uint8 tensor cache (`hf_prune.calibration.images`).
Augmentation: random 32×32 crop of the 4-pixel zero-padded image and horizontal flip.

The ResNet's stem (7×7 stride-2 convolution and max-pool, fixed in transformers) would shrink a
32×32 image to 8×8; its image processor therefore upsamples to 64×64, so the stages run at
16/8/4 pixels as a CIFAR ResNet's do, and the checkpoint stays a plain `ResNetForImageClassification`.

The epoch count may change on resume (the cosine schedule follows the new count); `--stop-after`
ends a run early so that such a sequence can be replayed exactly.

Resumable: every epoch writes the model (safetensors) and the optimizer state (safetensors)
under `outputs/train_vision/<model>/`; rerunning the same command continues after the last
finished epoch. The final folder (`--export`) holds config, weights and preprocessor config.

    python scripts/train_reference_vision.py --model vit --epochs 12
    python scripts/train_reference_vision.py --model resnet --epochs 12
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from hf_prune.calibration.images import JPEG_CAVEAT, cifar10
from hf_prune.evaluation import top1_accuracy

#: CIFAR-10 channel statistics (on [0, 1] pixels).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

MODELS = {
    "vit": {
        "config": transformers.ViTConfig(
            image_size=32,
            patch_size=4,
            hidden_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=192,
            num_labels=10,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        "model_class": transformers.ViTForImageClassification,
        "size": 32,
        "lr": 2e-3,
        "weight_decay": 0.05,
    },
    "resnet": {
        "config": transformers.ResNetConfig(
            embedding_size=32,
            hidden_sizes=[32, 64, 128],
            depths=[2, 2, 2],
            layer_type="basic",
            downsample_in_first_stage=False,
            num_labels=10,
        ),
        "model_class": transformers.ResNetForImageClassification,
        "size": 64,
        "lr": 2e-3,
        "weight_decay": 5e-4,
    },
}


def processor_for(size: int) -> transformers.ViTImageProcessor:
    return transformers.ViTImageProcessor(
        do_resize=size != 32,
        size={"height": size, "width": size},
        image_mean=list(MEAN),
        image_std=list(STD),
    )


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the 4-pixel padded image and a horizontal flip, on a uint8 batch."""
    n = images.shape[0]
    padded = nn.functional.pad(images, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    cropped = torch.stack([padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(3)
    return cropped


def normalise(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 → the processor's pixel values (rescale, bilinear upsampling where asked, normalise)."""
    pixels = images.float() / 255
    if size != pixels.shape[-1]:
        pixels = nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def save_state(folder: Path, model, optimizer, epoch: int, history: list[dict]) -> None:
    """Weights and optimizer moments as safetensors, the rest as JSON; written then renamed."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    moments = {}
    for index, parameter in enumerate(optimizer.param_groups[0]["params"]):
        state = optimizer.state.get(parameter, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                moments[f"{index}.{key}"] = state[key].contiguous()
    save_file(moments, str(staging / "optimizer.safetensors"))
    steps = [float(optimizer.state[p]["step"]) for p in optimizer.param_groups[0]["params"] if p in optimizer.state]
    (staging / "progress.json").write_text(
        json.dumps({"epoch": epoch, "step": steps[0] if steps else 0, "history": history})
    )
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def load_state(folder: Path, spec: dict, optimizer_factory):
    model = spec["model_class"].from_pretrained(folder)
    optimizer = optimizer_factory(model)
    moments = load_file(str(folder / "optimizer.safetensors"))
    progress = json.loads((folder / "progress.json").read_text())
    for index, parameter in enumerate(optimizer.param_groups[0]["params"]):
        if f"{index}.exp_avg" in moments:
            optimizer.state[parameter] = {
                "step": torch.tensor(progress["step"]),
                "exp_avg": moments[f"{index}.exp_avg"],
                "exp_avg_sq": moments[f"{index}.exp_avg_sq"],
            }
    return model, optimizer, progress["epoch"], progress["history"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--stop-after",
        type=int,
        help="stop (and export) after this epoch; the learning-rate schedule still follows --epochs, "
        "so a later run with another --epochs resumes from here (how the committed checkpoints were made)",
    )
    parser.add_argument("--work", type=Path, default=Path("outputs/train_vision"))
    parser.add_argument(
        "--export",
        type=Path,
        help="folder for the final checkpoint (default: reference_models/cifar10-<model>)",
    )
    parser.add_argument(
        "--save-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of the exported weights (float16 halves the file; load with dtype=torch.float32)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    work = args.work / args.model
    export = args.export or Path("reference_models") / f"cifar10-{args.model}"
    train, test = cifar10("train"), cifar10("test")
    processor = processor_for(spec["size"])

    def optimizer_factory(model):
        return torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])

    last = work / "last"
    if (last / "progress.json").is_file():
        model, optimizer, done, history = load_state(last, spec, optimizer_factory)
        print(f"resuming {args.model} after epoch {done}")
    else:
        torch.manual_seed(args.seed)
        model = spec["model_class"](spec["config"])
        optimizer = optimizer_factory(model)
        done, history = 0, []
    steps_per_epoch = len(train) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    warmup = steps_per_epoch // 2

    def learning_rate(step: int) -> float:
        if step < warmup:
            return spec["lr"] * (step + 1) / warmup
        return spec["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; {JPEG_CAVEAT}")
    print(f"{'epoch':>5} {'train loss':>10} {'test top-1':>10} {'seconds':>8}")
    for row in history:
        print(f"{row['epoch']:>5} {row['train_loss']:>10.4f} {row['test_top1']:>10.4f} {row['seconds']:>8.0f}")
    for epoch in range(done + 1, min(args.epochs, args.stop_after or args.epochs) + 1):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(train), generator=generator)
        model.train()
        losses = []
        for step in tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", leave=False):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            pixels = normalise(augment(train.images[batch], generator), spec["size"])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate((epoch - 1) * steps_per_epoch + step)
            loss = nn.functional.cross_entropy(
                model(pixel_values=pixels).logits,
                train.labels[batch],
                label_smoothing=0.1,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        accuracy = top1_accuracy(model, test, processor)
        row = {
            "epoch": epoch,
            "train_loss": sum(losses) / len(losses),
            "test_top1": accuracy,
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        print(
            f"{row['epoch']:>5} {row['train_loss']:>10.4f} {row['test_top1']:>10.4f} {row['seconds']:>8.0f}",
            flush=True,
        )
        save_state(last, model, optimizer, epoch, history)
    model.eval()
    shutil.rmtree(export, ignore_errors=True)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(export)
    processor.save_pretrained(export)
    (export / "training.json").write_text(
        json.dumps(
            {
                "command": f"python scripts/train_reference_vision.py --model "
                f"{args.model} --epochs {args.epochs} --batch-size {args.batch_size} "
                f"--seed {args.seed} --save-dtype {args.save_dtype}"
                + (f" --stop-after {args.stop_after}" if args.stop_after else ""),
                "history": history,
                "caveat": JPEG_CAVEAT,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {export}")


if __name__ == "__main__":
    main()
