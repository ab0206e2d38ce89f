"""Local copies of the named data sets, found through `HF_PRUNE_DATA_DIR` (layout: `DATA_LAYOUT`, docs/data.md)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataNotFoundError

DATA_DIR_VARIABLE = "HF_PRUNE_DATA_DIR"
#: What the data folder holds, relative to its root; every data error repeats it.
DATA_LAYOUT = (
    "the data folder holds wikitext-2-raw/wiki.test.raw (WikiText-2 raw test split, for perplexity), "
    "wikitext-2/wiki.valid.tokens (WikiText-2 validation split, for calibration='wikitext2') and "
    "cifar10/cifar10-jpg.tar.gz (CIFAR-10 in the imagefolder layout: train/ and test/, one subfolder per class), "
    "each needed only by what reads it"
)


def data_file(relative: str) -> Path:
    """A file under `$HF_PRUNE_DATA_DIR`; a typed error says where it looked and how to fix it."""
    root = os.environ.get(DATA_DIR_VARIABLE)
    if not root:
        raise DataNotFoundError(
            f"{DATA_DIR_VARIABLE} is not set; point it at a data folder (export {DATA_DIR_VARIABLE}=/path/to/data): "
            f"{DATA_LAYOUT}."
        )
    path = Path(root) / relative
    if not path.is_file() or path.stat().st_size == 0:
        raise DataNotFoundError(
            f"{path} is missing or empty (looked under {DATA_DIR_VARIABLE}={root}; {DATA_LAYOUT})."
        )
    return path


def wikitext2_test_text() -> str:
    """The WikiText-2 raw test split as one string, line endings normalised to LF."""
    return data_file("wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
