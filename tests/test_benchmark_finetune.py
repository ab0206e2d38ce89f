"""scripts/benchmark_finetune.py end to end on a random tiny Llama (SmolLM2's tokenizer, real WikiText-2
files): every row runs, the JSON holds them, a second run skips finished rows, the table compares."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from hf_prune.data import DATA_DIR_VARIABLE

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_finetune.py"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_benchmark_runs_every_row_and_resumes(smollm2, tmp_path, capsys, monkeypatch):
    if not Path(os.environ.get(DATA_DIR_VARIABLE, "/nonexistent"), "wikitext-2").is_dir():
        pytest.skip(f"needs WikiText-2 under ${DATA_DIR_VARIABLE}")
    spec = importlib.util.spec_from_file_location("benchmark_finetune", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    output = tmp_path / "results.json"
    argv = ["--model", "tiny", "--steps", "4", "--windows-per-step", "2", "--seq-len", "64", "--eval-windows", "2",
            "--seeds", "0", "--zero-shot-criteria", "magnitude,random", "--output", str(output)]

    results = benchmark.main(argv)
    assert sorted(results["rows"]) == [f"{row}/seed0" for row in sorted(benchmark.ROWS)]
    assert json.loads(output.read_text()) == results
    gradual = results["rows"]["gradual/seed0"]
    assert gradual["parameters"] == results["rows"]["oneshot-full/seed0"]["parameters"] < results["rows"]["dense/seed0"]["parameters"]
    assert results["rows"]["oneshot-full/seed0"]["criterion"] == results["rows"]["zero-shot/seed0"]["criterion"]
    assert "gradual" in capsys.readouterr().out

    monkeypatch.setattr(benchmark, "run_row", lambda *args, **kwargs: pytest.fail("finished rows must be skipped"))
    assert benchmark.main(argv) == results
    with pytest.raises(SystemExit):
        benchmark.main([*argv, "--steps", "5"])  # other settings: refuses to mix them into the same file
