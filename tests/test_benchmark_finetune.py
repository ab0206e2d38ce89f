"""scripts/benchmark_finetune.py end to end on a random tiny Llama (SmolLM2's tokenizer, real WikiText-2
files): every row runs with the chosen damping, the JSON holds them with their settings, a second run
skips finished rows, other settings are refused, the table compares below the reproducing command."""

import json
import os
from pathlib import Path

import pytest
import torch
from script_modules import script_module

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.data import DATA_DIR_VARIABLE
from hf_prune.errors import UsageError


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_benchmark_runs_every_row_and_resumes(smollm2, tmp_path, capsys, monkeypatch):
    if not Path(os.environ.get(DATA_DIR_VARIABLE, "/nonexistent"), "wikitext-2").is_dir():
        pytest.skip(f"needs WikiText-2 under ${DATA_DIR_VARIABLE}")
    benchmark = script_module("benchmark_finetune")
    output = tmp_path / "results.json"
    argv = [
        "--model",
        "tiny",
        "--steps",
        "4",
        "--windows-per-step",
        "2",
        "--seq-len",
        "64",
        "--windows",
        "2",
        "--seeds",
        "0",
        "--zero-shot-criteria",
        "magnitude,random",
        "--damping",
        "0.03",
        "--output",
        str(output),
    ]

    dampings = []  # of every prune and of the gradual row's callback
    prune = HFPruner.prune
    callback = benchmark.PruningCallback

    def recorded_prune(self, **kwargs):
        dampings.append(kwargs["damping"])
        return prune(self, **kwargs)

    def recorded_callback(config, **kwargs):
        dampings.append(config.damping)
        return callback(config, **kwargs)

    monkeypatch.setattr(HFPruner, "prune", recorded_prune)
    monkeypatch.setattr(benchmark, "PruningCallback", recorded_callback)
    results = benchmark.main(argv)
    # two zero-shot criteria, four one-shot rows, five callback rows (the one-shot schedule's prune reads its config)
    assert dampings == [0.03] * 11
    monkeypatch.undo()

    assert sorted(results["rows"]) == sorted(f"{row}/seed0" for row in benchmark.ROWS)
    assert json.loads(output.read_text()) == results
    assert results["settings"]["damping"] == 0.03 and results["settings"]["windows"] == 2
    assert results["settings"]["packages"]["peft"]
    gradual = results["rows"]["gradual/seed0"]
    one_shot = results["rows"]["oneshot-full/seed0"]
    assert gradual["parameters"] == one_shot["parameters"] < results["rows"]["dense/seed0"]["parameters"]
    assert one_shot["criterion"] == results["rows"]["zero-shot/seed0"]["criterion"]
    assert results["rows"]["callback-oneshot-distill/seed0"]["criterion"] == one_shot["criterion"]
    for row in (*benchmark.ONESHOT_ROWS, *benchmark.CALLBACK_ROWS):
        assert results["rows"][f"{row}/seed0"]["parameters"] == one_shot["parameters"], row
    assert results["settings"]["distill_alpha"] == 0.5 and results["settings"]["distill_temperature"] == 1.0
    printed = capsys.readouterr().out
    assert f"python scripts/benchmark_finetune.py {' '.join(argv)}\n" in printed
    assert "gradual" in printed and "2 × 64-token windows" in printed

    monkeypatch.setattr(benchmark, "run_row", lambda *args, **kwargs: pytest.fail("finished rows must be skipped"))
    assert benchmark.main(argv)["rows"] == results["rows"]
    others = (
        (["--steps", "5"], "steps"),
        (["--damping", "0.01"], "damping"),
        (["--eval-windows", "3"], "windows"),
        (["--distill-alpha", "0.9"], "distill_alpha"),
    )
    for other, key in others:
        with pytest.raises(SystemExit):  # other settings: refuses to mix them into the same file
            benchmark.main([*argv, *other])
        assert f"{key}: " in capsys.readouterr().err


class Stop(Exception):
    """Raised with the settings a run would record, before it measures anything."""


def test_defaults_are_the_whole_test_split_and_the_config_damping(smollm2, monkeypatch):
    if not Path(os.environ.get(DATA_DIR_VARIABLE, "/nonexistent"), "wikitext-2").is_dir():
        pytest.skip(f"needs WikiText-2 under ${DATA_DIR_VARIABLE}")
    benchmark = script_module("benchmark_finetune")

    def stop(path, settings, *args):
        raise Stop(settings)

    monkeypatch.setattr(benchmark, "open_results", stop)
    with pytest.raises(Stop) as caught:
        benchmark.main(["--model", "tiny"])
    settings = caught.value.args[0]
    assert settings["windows"] == 589  # every 512-token window of the WikiText-2 test split (SmolLM2 tokenizer)
    assert settings["damping"] == PruningConfig().damping
    assert settings["precision"] in ("bf16", "fp32")  # `auto` is resolved before it is recorded


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, "fp32"),  # an AVX2-only EPYC: bf16 emulated
        ({"avx512_f": True, "avx512_bf16": True}, "bf16"),  # Cooper Lake, Zen 4
        ({"avx512_f": True, "avx512_bf16": False, "amx_bf16": True}, "bf16"),  # Sapphire Rapids AMX
        ({}, "fp32"),
    ],
)
def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_instructions(capabilities, expected, monkeypatch):
    results_file = script_module("results_file")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert results_file.training_precision("auto", device="cpu") == expected
    assert results_file.training_precision("bf16", device="cpu") == "bf16"  # asked for: kept
    assert results_file.training_precision("fp32", device="cpu") == "fp32"
    with pytest.raises(UsageError, match="--precision"):
        results_file.training_precision("fp16", device="cpu")


class Stopped(Exception):
    """The stand-in for a run killed inside a trained row."""


@pytest.mark.parametrize("row", ["oneshot-distill-full", "gradual-both"])
def test_a_row_stopped_inside_resumes_from_its_checkpoint(row, smollm2, tmp_path, capsys, monkeypatch):
    """Killed after optimizer step 3 of 4 (checkpoints every 2 steps), the row resumes from step 2 on the next
    run: the same prune, then the weights, optimizer, schedule, RNG and the callback's masks and Gram
    accumulators from the checkpoint. Its perplexity equals an uninterrupted run's, and its work folder goes."""
    if not Path(os.environ.get(DATA_DIR_VARIABLE, "/nonexistent"), "wikitext-2").is_dir():
        pytest.skip(f"needs WikiText-2 under ${DATA_DIR_VARIABLE}")
    benchmark = script_module("benchmark_finetune")
    argv = ["--model", "tiny", "--steps", "4", "--windows-per-step", "2", "--seq-len", "64", "--windows", "2"]
    argv += ["--seeds", "0", "--zero-shot-criteria", "magnitude", "--save-steps", "2", "--rows", row]
    whole = benchmark.main([*argv, "--output", str(tmp_path / "whole.json")])["rows"][f"{row}/seed0"]

    steps = []
    step = benchmark.Trainer.training_step

    def killed(self, *args, **kwargs):
        if len(steps) == 3:
            raise Stopped
        steps.append(self.state.global_step)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(benchmark.Trainer, "training_step", killed)
    output = tmp_path / "stopped.json"
    with pytest.raises(Stopped):
        benchmark.main([*argv, "--output", str(output)])
    monkeypatch.undo()
    work = output.with_suffix(".work")
    assert [folder.name for folder in work.rglob("checkpoint-*")] == ["checkpoint-2"]
    capsys.readouterr()
    resumed = benchmark.main([*argv, "--output", str(output)])["rows"][f"{row}/seed0"]
    assert "resuming from" in capsys.readouterr().out
    assert resumed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    assert resumed["parameters"] == whole["parameters"]
    assert not work.exists()
