"""Every third-party import is declared in pyproject.toml, and every declared dependency is used.

A package installed by hand makes a local run green while a fresh machine fails (`make demo`
once died on an undeclared matplotlib), so this reads the imports themselves: every `import` and
`from ... import` in the tree (module level, inside functions and under `TYPE_CHECKING`), maps each
top-level name to the distributions that provide it (`importlib.metadata.packages_distributions`),
and compares with the requirements pyproject.toml declares.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# Modules of this repository, imported by the scripts and tests beside them (not distributions).
LOCAL = (
    {"hf_prune", "__future__"}
    | {p.stem for p in (ROOT / "tests").glob("*.py")}
    | {p.stem for p in (ROOT / "scripts").glob("*.py")}
)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def imported_names(folder: Path) -> dict[str, list[str]]:
    """Top-level module name → the files that import it, for every absolute import under `folder`."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def undeclared(imports: dict[str, list[str]], declared: set[str]) -> list[str]:
    """The imports that are neither the standard library, this repository, nor a declared distribution."""
    distributions = packages_distributions()
    problems = []
    for name, files in sorted(imports.items()):
        if name in sys.stdlib_module_names or name in LOCAL:
            continue
        # An extra that is not installed here has no distribution to look up: its module name must be its name.
        provided_by = {_normalise(d) for d in distributions.get(name, [])} or {_normalise(name)} & declared
        if not provided_by & declared:
            what = ", ".join(sorted(provided_by)) or "no installed distribution"
            problems.append(f"{name} ({what}) imported by {files[0]}")
    return problems


def core_requirements() -> set[str]:
    return {_requirement_name(r) for r in PYPROJECT["dependencies"]}


def extra_requirements(*extras: str) -> set[str]:
    """The requirements of `extras` (default: all), an extra that names this package's own extras
    (`hf_prune[eval]`) read through to theirs."""
    optional = PYPROJECT.get("optional-dependencies", {})
    found = set()
    for extra in extras or optional:
        for requirement in optional[extra]:
            name = _requirement_name(requirement)
            if name == _normalise(PYPROJECT["name"]):
                found |= extra_requirements(*re.search(r"\[(.*)\]", requirement)[1].replace(" ", "").split(","))
            else:
                found.add(name)
    return found


def test_package_imports_are_declared():
    problems = undeclared(imported_names(ROOT / "hf_prune"), core_requirements() | extra_requirements())
    assert not problems, f"declare these in pyproject.toml [project] dependencies (or an extra): {problems}"


def test_every_core_dependency_is_imported_by_the_package():
    distributions = packages_distributions()
    used = {_normalise(d) for name in imported_names(ROOT / "hf_prune") for d in distributions.get(name, [])}
    unused = sorted(core_requirements() - used)
    assert not unused, f"declared in pyproject.toml but never imported by hf_prune: {unused}; use them or drop them"


@pytest.mark.parametrize("folder, extras", [("tests", ("test",)), ("scripts", ("bench", "test"))])
def test_tests_and_scripts_imports_are_declared(folder, extras):
    problems = undeclared(imported_names(ROOT / folder), core_requirements() | extra_requirements(*extras))
    assert not problems, f"declare these in pyproject.toml (dependencies or the {extras} extra): {problems}"


def test_the_check_sees_an_undeclared_import(tmp_path, monkeypatch):
    """The check itself, on a scratch module: an import inside a function of a package nobody declares."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("import os\n\ndef f():\n    import yaml\n    from torch import nn\n")
    imports = imported_names(tmp_path / "pkg")
    assert undeclared(imports, {"pyyaml", "torch"}) == []
    assert undeclared(imports, {"torch"}) == ["yaml (pyyaml) imported by pkg/mod.py"]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_ci_tests_both_ends_of_the_declared_transformers_range():
    """`.ci/run` runs the suite on the lowest release the range admits and on one below its upper bound."""
    (requirement,) = [r for r in PYPROJECT["dependencies"] if _requirement_name(r) == "transformers"]
    lower = _version(re.search(r">=\s*([\d.]+)", requirement).group(1))
    upper = _version(re.search(r"<\s*([\d.]+)", requirement).group(1))
    assert upper[:2] > lower[:2], f"{requirement} admits one minor release only; declare the range the suite passes on"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    versions = [_version(v) for v in re.search(r"TRANSFORMERS_VERSIONS=\(([^)]*)\)", ci).group(1).split()]
    assert versions[0][: len(lower)] == lower, (
        f".ci/run's lowest transformers {versions[0]} is not {requirement}'s lower end"
    )
    newest_minor = (upper[0], upper[1] - 1)  # the range ends below `upper`: its newest minor release is tested
    assert lower <= versions[-1] < upper and versions[-1][:2] == newest_minor, (
        f".ci/run's newest transformers {versions[-1]} is not a {newest_minor} release inside {requirement}"
    )
