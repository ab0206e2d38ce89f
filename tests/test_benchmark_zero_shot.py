"""scripts/benchmark_zero_shot.py on a random tiny Llama (SmolLM2's tokenizer, real WikiText-2 files):
the whole test split by default, `--windows N` its first N windows (valid: the last N), every row
at `--damping`, rows resumed under the same settings and other settings refused."""

import json
import os
from pathlib import Path

import pytest
from script_modules import script_module

from hf_prune import HFPruner
from hf_prune.calibration.data import DATA_DIR_VARIABLE, data_file, wikitext2_test_text


@pytest.fixture(autouse=True)
def needs_wikitext(smollm2):
    if not Path(os.environ.get(DATA_DIR_VARIABLE, "/nonexistent"), "wikitext-2").is_dir():
        pytest.skip(f"needs WikiText-2 under ${DATA_DIR_VARIABLE}")


@pytest.fixture(scope="module")
def zero_shot():
    return script_module("benchmark_zero_shot")


def test_evaluation_windows(zero_shot):
    tokenizer = script_module("results_file").smollm2_tokenizer()
    test = tokenizer(wikitext2_test_text(), add_special_tokens=False).input_ids
    valid = tokenizer(data_file("wikitext-2/wiki.valid.tokens").read_text(), add_special_tokens=False).input_ids

    ids, available = zero_shot.evaluation_ids(tokenizer, "test", None)
    assert available == len(test) // 512 == 589
    assert ids.tolist() == test[: 589 * 512]
    ids, _ = zero_shot.evaluation_ids(tokenizer, "test", 3)
    assert ids.tolist() == test[: 3 * 512]
    ids, available = zero_shot.evaluation_ids(tokenizer, "valid", 2)
    assert available == len(valid) // 512 and ids.tolist() == valid[-2 * 512 :]


def test_tiny_rows_resume_and_other_settings_are_refused(zero_shot, tmp_path, capsys, monkeypatch, one_thread):
    output = tmp_path / "zero_shot.json"
    argv = [
        "--model",
        "tiny",
        "--rows",
        "mlp25/magnitude,mlp25/obs+lstsq",
        "--windows",
        "2",
        "--num-samples",
        "4",
        "--damping",
        "0.02",
        "--threads",
        "1",
        "--output",
        str(output),
    ]
    dampings = []
    prune = HFPruner.prune

    def recorded(self, config, **kwargs):
        dampings.append(config.damping)
        return prune(self, config, **kwargs)

    monkeypatch.setattr(HFPruner, "prune", recorded)
    rows = zero_shot.main(argv)
    monkeypatch.undo()
    assert dampings == [0.02, 0.02]

    stored = json.loads(output.read_text())
    assert stored["rows"] == rows and sorted(rows) == ["dense", "mlp25/magnitude", "mlp25/obs+lstsq"]
    assert stored["settings"]["windows"] == 2 and stored["settings"]["damping"] == 0.02
    for name in ("mlp25/magnitude", "mlp25/obs+lstsq"):
        assert rows[name]["ratio"] == pytest.approx(rows[name]["perplexity"] / rows["dense"]["perplexity"])
        assert rows[name]["parameters"] < rows["dense"]["parameters"]
    printed = capsys.readouterr().out
    assert f"python scripts/benchmark_zero_shot.py {' '.join(argv)}\n" in printed
    assert "WikiText-2 test, the first 2 of 589 windows of 512 tokens" in printed

    monkeypatch.setattr(zero_shot, "hf_prune_row", lambda *args: pytest.fail("finished rows must be skipped"))
    assert zero_shot.main(argv) == rows
    with pytest.raises(SystemExit):
        zero_shot.main([*argv, "--windows", "3"])
    assert "windows: 2 in the file, 3 here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        zero_shot.main([*argv, "--damping", "0.01"])
    assert "damping: 0.02 in the file, 0.01 here" in capsys.readouterr().err


def test_tasks_join_every_row_and_the_resume_key(zero_shot, tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "tasks.json"
    argv = [
        "--model",
        "tiny",
        "--rows",
        "mlp25/magnitude",
        "--windows",
        "1",
        "--threads",
        "1",
        "--output",
        str(output),
    ]
    rows = zero_shot.main([*argv, "--tasks", "wikitext2_lastword", "--task-limit", "2"])
    for name in ("dense", "mlp25/magnitude"):
        assert set(rows[name]["tasks"]) == {"wikitext2_lastword/acc", "wikitext2_lastword/perplexity"}
    stored = json.loads(output.read_text())["settings"]
    assert (stored["tasks"], stored["task_limit"]) == (["wikitext2_lastword"], 2) and "lm-eval" in stored["packages"]
    printed = capsys.readouterr().out
    assert "tasks: wikitext2_lastword/acc, first 2 examples" in printed
    header = next(line for line in printed.splitlines() if line.startswith("row "))
    assert header.endswith("wikitext2_lastword")
    dense_line = next(line for line in printed.splitlines() if line.startswith("dense "))
    assert dense_line.endswith(f"{rows['dense']['tasks']['wikitext2_lastword/acc']:.4f}")
    with pytest.raises(SystemExit):
        zero_shot.main([*argv, "--tasks", "wikitext2_lastword", "--task-limit", "3"])
    assert "task_limit: 2 in the file, 3 here" in capsys.readouterr().err
