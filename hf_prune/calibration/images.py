"""Image data for calibration and evaluation: CIFAR-10 and folders of images in the `imagefolder` layout.

`datasets` cannot read the CIFAR-10 tarball of `$HF_PRUNE_DATA_DIR/cifar10` as an image folder, so
it is extracted once, atomically, into a cache folder outside the repository
(`$HF_PRUNE_CACHE`, else `$HF_HOME/hf_prune`, else `~/.cache/hf_prune`). Decoded splits are kept
beside it as uint8 tensors in safetensors, so later runs skip the 60,000 JPEG decodes.

The local CIFAR-10 copy stores every image as a quality-75 JPEG: models score about 11 points
below the original test set on it (`JPEG_CAVEAT`), which every vision report states.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import DataNotFoundError
from ..output.atomic import write_atomically
from .data import DATA_DIR_VARIABLE, data_file

CIFAR10_ARCHIVE = "cifar10/cifar10-jpg.tar.gz"
CACHE_VARIABLE = "HF_PRUNE_CACHE"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_CAVEAT = (
    "CIFAR-10 here is the local quality-75 JPEG copy: accuracies are about 11 points below the original "
    "CIFAR-10 test set (a ResNet-20 at 92% on the original scores about 81% on these JPEGs)."
)


@dataclass(frozen=True)
class ImageSet:
    """Decoded images (uint8, N × 3 × H × W), their labels and the class names labels index."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def cache_root() -> Path:
    """Where extracted and decoded data sets live (never inside the repository)."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hf_prune"
    return Path.home() / ".cache" / "hf_prune"


def cifar10_folder() -> Path:
    """The extracted CIFAR-10 folder (`train/`, `test/`, one subfolder per class), extracted on first use."""
    target = cache_root() / "cifar10"
    if (target / "test").is_dir() and (target / "train").is_dir():
        return target
    archive = data_file(CIFAR10_ARCHIVE)

    def extract(staging: Path) -> None:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")

    # A half-extracted cache never appears; a concurrent extraction's copy is simply replaced.
    return write_atomically(target, extract, overwrite=True)


def read_image_folder(folder: str | os.PathLike) -> ImageSet:
    """Every image of an `imagefolder` layout (one subfolder per class), decoded to RGB uint8.

    All images must share one size (as CIFAR-10's do); a typed error says where nothing was found.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder {folder} does not exist.")
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataNotFoundError(
            f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders "
            "(the imagefolder layout: FOLDER/CLASS/IMAGE)."
        )
    images = []
    for path, _ in tqdm(files, desc=f"decoding {folder.name}", unit="image", leave=False):
        with Image.open(path) as image:
            images.append(
                torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).view(
                    image.height, image.width, 3
                )
            )
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise DataNotFoundError(
            f"images in {folder} have different sizes {sorted(sizes)[:3]}; resize them to one size."
        )
    return ImageSet(
        torch.stack(images).permute(0, 3, 1, 2).contiguous(),
        torch.tensor([label for _, label in files]),
        classes,
    )


def cifar10(split: str = "test") -> ImageSet:
    """One CIFAR-10 split (`train`: 50,000 images, `test`: 10,000) from the local JPEG copy, decoded once
    and cached."""
    if split not in ("train", "test"):
        raise DataNotFoundError(f"CIFAR-10 split {split!r} does not exist; use 'train' or 'test'.")
    cached = cache_root() / f"cifar10-{split}.safetensors"
    if cached.is_file():
        tensors = load_file(str(cached))
        classes = tuple(cifar10_folder().joinpath(split).iterdir())
        return ImageSet(
            tensors["images"],
            tensors["labels"],
            tuple(sorted(p.name for p in classes if p.is_dir())),
        )
    images = read_image_folder(cifar10_folder() / split)
    staging = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    save_file({"images": images.images, "labels": images.labels}, str(staging))
    os.replace(staging, cached)
    return images


def image_set(source: str | os.PathLike) -> ImageSet:
    """A named image set (`"cifar10"`: its train split, for calibration) or an image folder path."""
    if isinstance(source, str) and source == "cifar10":
        return cifar10("train")
    path = Path(source)
    if not path.is_dir():
        raise DataNotFoundError(
            f"calibration={str(source)!r} is neither 'cifar10' nor an image folder (looked for {path.resolve()}); "
            f"{DATA_DIR_VARIABLE} must hold {CIFAR10_ARCHIVE} for 'cifar10'."
        )
    return read_image_folder(path)


def is_image_source(source: object) -> bool:
    """Whether a calibration source names image data: `"cifar10"` or a folder whose class subfolders hold images."""
    if isinstance(source, str) and source == "cifar10":
        return True
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return False
    return any(
        path.suffix.lower() in IMAGE_SUFFIXES
        for sub in Path(source).iterdir()
        if sub.is_dir()
        for path in sub.iterdir()
    )


def pixel_values(images: torch.Tensor, processor) -> torch.Tensor:
    """uint8 images (N × 3 × H × W) → the model's `pixel_values`, through its image processor."""
    if processor is None:
        raise DataNotFoundError(
            "image calibration and evaluation need the model's image processor: pass processor= to HFPruner "
            "(from_pretrained loads it from the checkpoint folder)."
        )
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


def calibration_pixels(source: str | os.PathLike, processor, num_samples: int, seed: int = 0) -> torch.Tensor:
    """`num_samples` images drawn reproducibly from an image source, as processed `pixel_values`."""
    images = image_set(source)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(images), generator=generator)[:num_samples]
    return pixel_values(images.images[chosen], processor)
