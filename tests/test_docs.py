"""What users get points only inside the repository, and every `docs/methods.md §N` it cites exists."""

import re
from pathlib import Path

import pytest

from hf_prune.allocation import available_allocations
from hf_prune.calibration.data import data_file
from hf_prune.criteria import available_criteria
from hf_prune.errors import DataNotFoundError

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
#: What a wheel ships (the package, the model-card template) and what users copy (the recipes).
SHIPPED = ("hf_prune", "model_cards", "recipes")
#: Everything that may cite the notes.
CITING = (*SHIPPED, "scripts", "docs", "README.md")
FORBIDDEN = ("../shared", "METHODS.md")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
#: `methods.md` followed by one or more section marks: "docs/methods.md §4.1, §4.4".
CITATION = re.compile(r"methods\.md((?:[ ,;]*(?:and )?§\d+(?:\.\d+)*)+)")
SECTION_MARK = re.compile(r"§(\d+(?:\.\d+)*)")


def _text_files(*names: str) -> list[Path]:
    files = []
    for name in names:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in candidates if "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return files


def _sections() -> list[str]:
    return HEADING.findall(METHODS.read_text(encoding="utf-8"))


def test_shipped_files_never_point_outside_the_repository():
    offending = [
        f"{path.relative_to(ROOT)}: {needle}"
        for path in _text_files(*SHIPPED)
        for needle in FORBIDDEN
        if needle in path.read_text(encoding="utf-8")
    ]
    assert not offending, offending


def test_section_numbers_are_unique():
    sections = _sections()
    assert len(sections) > 30
    assert len(sections) == len(set(sections)), sorted(s for s in sections if sections.count(s) > 1)


def test_every_cited_section_exists():
    sections = set(_sections())
    cited, missing = 0, []
    for path in _text_files(*CITING):
        text = path.read_text(encoding="utf-8")
        marks = [m for citation in CITATION.findall(text) for m in SECTION_MARK.findall(citation)]
        if path == METHODS:  # its own cross-references: every § in it
            marks = SECTION_MARK.findall(text)
        cited += len(marks)
        missing += [f"{path.relative_to(ROOT)}: §{mark}" for mark in marks if mark not in sections]
    assert cited > 40  # the pattern still finds the citations
    assert not missing, missing


@pytest.mark.parametrize(
    "section, names",
    [("3", available_criteria()), ("5", available_allocations())],
    ids=["criteria", "allocations"],
)
def test_every_registered_criterion_and_allocation_has_its_section(section, names):
    text = METHODS.read_text(encoding="utf-8")
    documented = set(re.findall(rf"^### {section}\.\d+ `(\w+)`", text, re.MULTILINE))
    assert set(names) <= documented, sorted(set(names) - documented)


def test_a_missing_data_folder_is_described_not_pointed_at(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_PRUNE_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError) as unset:
        data_file("wikitext-2/wiki.valid.tokens")
    monkeypatch.setenv("HF_PRUNE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as missing:
        data_file("wikitext-2/wiki.valid.tokens")
    for message in (str(unset.value), str(missing.value)):
        for relative in ("wikitext-2-raw/wiki.test.raw", "wikitext-2/wiki.valid.tokens", "cifar10/cifar10-jpg.tar.gz"):
            assert relative in message
        assert "../shared" not in message


#: Folders of one-file-per-method plug-ins: the layout names the folder's shared files, not every plug-in.
PLUGIN_FOLDERS = ("groups", "criteria", "allocation")


def _layout_entries() -> dict[str, str]:
    """The README's `## Layout` block: each `  name` entry under `hf_prune/` with its continuation lines."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("\n## Layout", 1)[1].split("```", 2)[1]
    lines = block.split("hf_prune/\n", 1)[1].splitlines()
    entries: dict[str, str] = {}
    current = None
    for line in lines:
        if not line.startswith("  "):
            break  # the next top-level folder (model_cards/, recipes/, ...)
        if line[2] != " ":
            current = line.split()[0]
            entries[current] = line
        elif current:
            entries[current] += "\n" + line
    return entries


def test_the_readme_layout_matches_the_package_tree():
    """Every module and folder of hf_prune/ has its line in the README's layout, every stage folder's line
    names each of its modules, and nothing the layout names is missing from the tree."""
    package = ROOT / "hf_prune"
    entries = _layout_entries()
    modules = sorted(p.name for p in package.glob("*.py") if p.name != "__init__.py")
    folders = sorted(p.name + "/" for p in package.iterdir() if (p / "__init__.py").is_file())
    assert sorted(entries) == sorted(modules + folders), "README.md ## Layout: update it to the tree under hf_prune/"
    missing = []
    for folder in folders:
        names = sorted(p.name for p in (package / folder).glob("*.py") if p.name != "__init__.py")
        mentioned = set(re.findall(r"\b(\w+\.py)\b", entries[folder]))
        missing += [f"{folder}{name} is not in the tree" for name in sorted(mentioned - set(names))]
        if folder.rstrip("/") not in PLUGIN_FOLDERS:
            missing += [f"{folder}{name} has no line" for name in names if name not in mentioned]
    assert not missing, missing
