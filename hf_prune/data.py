"""Local copies of the named data sets, found through `HF_PRUNE_DATA_DIR` (layout: ../shared/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataNotFoundError

DATA_DIR_VARIABLE = "HF_PRUNE_DATA_DIR"


def data_file(relative: str) -> Path:
    """A file under `$HF_PRUNE_DATA_DIR`; a typed error says where it looked and how to fix it."""
    root = os.environ.get(DATA_DIR_VARIABLE)
    if not root:
        raise DataNotFoundError(
            f"{DATA_DIR_VARIABLE} is not set; point it at the data folder (e.g. export {DATA_DIR_VARIABLE}=../shared/data)."
        )
    path = Path(root) / relative
    if not path.is_file() or path.stat().st_size == 0:
        raise DataNotFoundError(f"{path} is missing or empty (looked under {DATA_DIR_VARIABLE}={root}).")
    return path


def wikitext2_test_text() -> str:
    """The WikiText-2 raw test split as one string, line endings normalised to LF."""
    return data_file("wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
