"""Import the scripts of scripts/ as modules in tests, with scripts/ on `sys.path` as when a script runs
(they import each other, e.g. results_file)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script_module(name: str) -> ModuleType:
    """`scripts/<name>.py` imported as the module `name`."""
    if str(SCRIPTS) not in sys.path:
        sys.path.append(str(SCRIPTS))
    return importlib.import_module(name)
