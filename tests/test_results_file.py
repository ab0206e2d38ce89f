"""scripts/results_file.py: a results file resumes only under the same settings, names every differing
setting when it refuses, survives an interrupted write, and prints the command that reproduces it."""

import json
import os

import pytest
from script_modules import SCRIPTS, script_module

results_file = script_module("results_file")

SETTINGS = {"model": "tiny", "split": "test", "windows": 589, "damping": 1e-4, "seeds": [0, 1], "target": {"mlp": 0.5}}


def test_same_settings_resume_the_finished_rows(tmp_path):
    path = tmp_path / "results.json"
    first = results_file.ResultsFile(path, SETTINGS, "python scripts/x.py")
    assert first.rows == {} and "a" not in first
    first.save_row("a", {"perplexity": 30.0})
    first.info["calibration_seconds"] = 1.5
    first.save_row("b", {"perplexity": 40.0})

    again = results_file.ResultsFile(path, dict(reversed(SETTINGS.items())), "python scripts/x.py --rows b")
    assert "a" in again and "b" in again and "c" not in again
    assert again.rows == {"a": {"perplexity": 30.0}, "b": {"perplexity": 40.0}}
    assert again.info == {"calibration_seconds": 1.5}
    stored = json.loads(path.read_text())
    assert stored["settings"]["damping"] == 1e-4 and stored["settings"]["seeds"] == [0, 1]
    assert set(stored["settings"]["packages"]) == {"torch", "transformers"}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"damping": 1e-2}, "damping"),
        ({"windows": 80}, "windows"),
        ({"seeds": [0]}, "seeds"),
        ({"target": {"mlp": 0.25}}, "target.mlp"),
        ({"threads": 2}, "threads"),  # a setting the file does not have
    ],
)
def test_any_other_setting_is_refused_with_the_key_named(tmp_path, change, key):
    path = tmp_path / "results.json"
    results_file.ResultsFile(path, SETTINGS, "python scripts/x.py").save_row("a", {"perplexity": 30.0})
    before = path.read_bytes()
    with pytest.raises(results_file.SettingsMismatchError) as error:
        results_file.ResultsFile(path, {**SETTINGS, **change}, "python scripts/x.py")
    listed = [line.strip() for line in str(error.value).splitlines() if line.startswith("  ")]
    assert len(listed) == 1 and listed[0].startswith(f"{key}: ")  # the differing key, and only it
    assert "--output" in str(error.value)
    assert path.read_bytes() == before


def test_another_package_version_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    results_file.ResultsFile(path, SETTINGS, "python scripts/x.py").save()
    monkeypatch.setattr(results_file, "version", lambda name: "0.0.1")
    with pytest.raises(results_file.SettingsMismatchError, match=r"packages\.torch: .*'0\.0\.1' here"):
        results_file.ResultsFile(path, SETTINGS, "python scripts/x.py")


def test_a_file_without_settings_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"dense": {"perplexity": 29.52}, "rows": {}}))
    with pytest.raises(results_file.SettingsMismatchError, match="records no settings"):
        results_file.ResultsFile(path, SETTINGS, "python scripts/x.py")


def test_an_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    results = results_file.ResultsFile(path, SETTINGS, "python scripts/x.py")
    results.save_row("a", {"perplexity": 30.0})
    before = path.read_bytes()

    def interrupted(descriptor):  # the new content is written, not yet in place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        results.save_row("b", {"perplexity": 40.0})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no partial file left behind

    monkeypatch.undo()
    with pytest.raises(TypeError):  # a row JSON cannot hold: nothing reaches the disk
        results.save_row("c", {"perplexity": object()})
    assert path.read_bytes() == before
    assert results_file.ResultsFile(path, SETTINGS, "").rows == {"a": {"perplexity": 30.0}}


def test_command_line_and_report(tmp_path, capsys):
    command = results_file.command_line(SCRIPTS / "benchmark_speed.py", ["--repeats", "3", "--output", "a b.json"])
    assert command == "python scripts/benchmark_speed.py --repeats 3 --output 'a b.json'"
    results = results_file.ResultsFile(tmp_path / "speed.json", {"threads": 2}, command)
    results.report("row  seconds\nx    1.0")
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == command
    assert printed.splitlines()[1].startswith("settings: threads=2; packages=torch ")
    assert printed.endswith("row  seconds\nx    1.0\n")
    assert (tmp_path / "speed.txt").read_text() == printed
