"""Output folders written all at once: a crash or interrupt leaves the previous folder, never a partial one.

Every writer of a folder (checkpoints, the callback's state, the extracted CIFAR-10 cache) goes through
`write_atomically`; this module imports nothing from hf_prune but its errors, so any stage may use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputExistsError


def check_output_folder(folder: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without `overwrite`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"output folder {str(folder)!r} is an existing file; choose another path.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {str(folder)!r} exists and is not empty; choose another folder or pass overwrite=True "
            "(CLI: --overwrite). Nothing in it was touched."
        )


def write_atomically(folder: str | os.PathLike, write, overwrite: bool = False) -> Path:
    """Call `write(staging)` on a temporary folder beside `folder`, then move it into place.

    An error or interrupt midway leaves no partial output and the previous folder untouched.
    """
    folder = Path(folder).resolve()
    check_output_folder(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        write(staging)
        if folder.exists():
            retired = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
            os.replace(folder, retired / "folder")
            os.replace(staging, folder)
            shutil.rmtree(retired)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def write_file_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then move it into place: readers see the old
    file or the new one, never a partial one."""
    path = Path(path)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path
