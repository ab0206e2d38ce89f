"""`hf-prune prune`: exit codes 0 / 1 / 2, the printed summary, nothing written on failure."""

import json
import os
import subprocess
import sys

import pytest

from hf_prune.cli import main


def test_prune_prints_the_summary_and_writes_the_folder(tiny_llama, tmp_path, capsys):
    code = main(
        [
            "prune",
            "--model",
            str(tiny_llama),
            "--output",
            str(tmp_path / "out"),
            "--kv-groups",
            "1",
            "--criterion",
            "magnitude",
            "--reconstruct",
            "none",
            "--mlp-neurons",
            "0.25",
            "--layers",
            "1",
            "--report-json",
            str(tmp_path / "report.json"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "heads 6→4 (3→2 KV), neurons 48→36" in printed and "layer removed" in printed
    assert "output format: vanilla" in printed
    assert json.loads((tmp_path / "report.json").read_text())["output_format"] == "vanilla"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--mlp-neurons", "1.5"], "mlp_neurons=1.5 is a fraction"),
        (["--layers", "4"], "layers=4 removes all 4 layers"),
        (["--attention-heads", "0.1"], "smallest valid fraction is 0.25"),
    ],
)
def test_bad_targets_exit_2_and_write_nothing(tiny_llama, tmp_path, capsys, arguments, message):
    assert main(["prune", "--model", str(tiny_llama), "--output", str(tmp_path / "out"), *arguments]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert os.listdir(tmp_path) == []


def test_existing_output_exits_2_before_loading(tiny_llama, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["prune", "--model", str(tiny_llama), "--output", str(tmp_path), "--mlp-neurons", "0.5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_missing_model_exits_1(tmp_path, capsys):
    assert (
        main(["prune", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), "--layers", "1"]) == 1
    )
    assert "failed" in capsys.readouterr().err


def test_malformed_amount_is_an_argparse_error_exit_2(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "hf_prune.cli", "prune", "--model", "x", "--output", "y", "--layers", "many"],
        capture_output=True,
        text=True,
    )
    assert process.returncode == 2 and "neither a fraction" in process.stderr


def test_help_teaches_with_examples():
    process = subprocess.run([sys.executable, "-m", "hf_prune.cli", "prune", "--help"], capture_output=True, text=True)
    assert process.returncode == 0 and "pypi:smollm2-135m-instruct" in process.stdout


def test_budget_allocation_and_protected_layers_from_the_command_line(tiny_llama, tmp_path, capsys):
    code = main(
        [
            "prune",
            "--model",
            str(tiny_llama),
            "--output",
            str(tmp_path / "out"),
            "--sparsity",
            "0.3",
            "--allocation",
            "global",
            "--protected-layers",
            "0,-1",
            "--round-to",
            "4",
            "--criterion",
            "magnitude",
            "--reconstruct",
            "none",
            "--report-json",
            str(tmp_path / "report.json"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["protected_layers"] == [0, -1] and report["config"]["allocation"] == "global"
    assert report["output_format"] == "loader"
