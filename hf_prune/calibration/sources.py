"""Calibration data → token windows: named sets, files, folders, datasets or in-memory lists.

Text is tokenized in one call and `num_samples` windows of `seq_len` tokens are cut at seeded
random offsets. Named sets resolve to the local copy under `$HF_PRUNE_DATA_DIR` when that is
set, else to the Hub (`Salesforce/wikitext`, `wikitext-2-raw-v1`, train split).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DataNotFoundError
from .data import DATA_DIR_VARIABLE, DATA_LAYOUT, data_file
from .images import calibration_pixels, is_image_source

CalibrationSource = str | os.PathLike | Sequence[str] | Sequence[torch.Tensor] | object
NAMED_SETS = ("wikitext2",)


def _named_text(name: str) -> str:
    if os.environ.get(DATA_DIR_VARIABLE):
        return data_file("wikitext-2/wiki.valid.tokens").read_text(encoding="utf-8")
    import datasets

    try:
        rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="train")["text"]
    except Exception as error:
        raise DataNotFoundError(
            f"calibration={name!r}: {DATA_DIR_VARIABLE} is unset and the Hub copy (Salesforce/wikitext, "
            f"wikitext-2-raw-v1) could not be loaded ({error}). Set {DATA_DIR_VARIABLE} to a local data folder; "
            f"{DATA_LAYOUT}."
        ) from error
    return "\n\n".join(rows)


def _dataset_text(dataset, described: str) -> str:
    if "text" not in dataset.column_names:
        raise DataNotFoundError(f"calibration {described} has no 'text' column (columns: {dataset.column_names}).")
    return "\n\n".join(row for row in dataset["text"] if row)


def _path_text(path: Path) -> str:
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        if not files:
            raise DataNotFoundError(f"calibration folder {path} holds no *.parquet files (the Hub's layout).")
        import datasets

        return _dataset_text(datasets.load_dataset("parquet", data_files=files, split="train"), str(path))
    raise DataNotFoundError(f"calibration path {path} does not exist.")


def calibration_text(source: CalibrationSource) -> str:
    """The raw text a text calibration source stands for."""
    if isinstance(source, str) and source in NAMED_SETS:
        text = _named_text(source)
    elif isinstance(source, (str, os.PathLike)):
        text = _path_text(Path(source))
    elif hasattr(source, "column_names"):
        text = _dataset_text(source, "dataset")
    elif isinstance(source, Sequence) and all(isinstance(item, str) for item in source):
        text = "\n\n".join(source)
    else:
        raise DataNotFoundError(
            f"calibration={type(source).__name__} is not supported: pass {', '.join(map(repr, NAMED_SETS))}, a text "
            "file, a folder of parquet files, a datasets.Dataset with a 'text' column, or a list of strings or "
            "token tensors."
        )
    if not text.strip():
        raise DataNotFoundError(f"calibration source {source!r} is empty.")
    return text


def token_windows(
    source: CalibrationSource, tokenizer, num_samples: int, seq_len: int, seed: int = 0, processor=None
) -> torch.Tensor:
    """`num_samples × seq_len` token ids for calibration, drawn reproducibly from `source`; for an
    image source (`"cifar10"`, an image folder) `num_samples` images through the image `processor`."""
    if is_image_source(source) or (
        processor is not None and tokenizer is None and isinstance(source, (str, os.PathLike))
    ):
        return calibration_pixels(source, processor, num_samples, seed)
    if isinstance(source, Sequence) and source and all(isinstance(item, torch.Tensor) for item in source):
        if source[0].is_floating_point():  # images: (N, C, H, W) pixel batches, used as they are
            return torch.cat(list(source))[:num_samples]
        windows = torch.cat([item.reshape(-1, item.shape[-1]) for item in source])
        return windows[:num_samples].long()
    if tokenizer is None:
        raise DataNotFoundError(
            "text calibration needs a tokenizer: pass one to HFPruner or load it with from_pretrained."
        )
    ids = tokenizer(calibration_text(source), return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[
        0
    ]
    if ids.numel() < seq_len:
        raise DataNotFoundError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([ids[start : start + seq_len] for start in starts.tolist()])
