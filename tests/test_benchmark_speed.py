"""scripts/benchmark_speed.py's measurements on a tiny Llama: the stages add up to the prune, the dense
model is left as it was, the inference rows compare dense and pruned, the table prints them."""

import importlib.util
from pathlib import Path

import pytest
from tiny_models import FAMILIES, calibration_windows

from hf_prune import PruningConfig
from hf_prune.evaluation import parameter_count

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_speed.py"


@pytest.fixture(scope="module")
def speed_script():
    spec = importlib.util.spec_from_file_location("benchmark_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prune_stages_add_up_and_the_dense_model_stays(speed_script, one_thread):
    dense = FAMILIES["llama"].build()
    before = parameter_count(dense)
    config = PruningConfig(
        attention_heads=1,
        mlp_neurons=0.25,
        layers=1,
        calibration=calibration_windows(8, 16),
        num_samples=8,
        seq_len=16,
        batch_size=4,
    )
    row = speed_script.prune_row(dense, None, config)
    assert parameter_count(dense) == before  # each repeat prunes a copy
    assert set(row["stages_s"]) == {*speed_script.STAGES, "other"}
    assert sum(row["stages_s"].values()) == pytest.approx(row["prune_s"], abs=0.01)
    assert row["stages_s"]["calibration"] > 0 and row["stages_s"]["score+plan"] > 0
    # The row's seconds are rounded to milliseconds; the ratio comes from the unrounded ones.
    assert row["prune_ratio"] == pytest.approx(row["prune_s"] / row["forward_s"], rel=0.01 + 0.001 / row["forward_s"])
    assert row["tokens"] == 8 * 16


def test_inference_row_and_table(speed_script, one_thread, monkeypatch):
    monkeypatch.setattr(speed_script, "PREFILL_TOKENS", 32)
    monkeypatch.setitem(speed_script.INFERENCE_ROWS, "tiny-mlp", ({"mlp_neurons": 16}, False))
    row = speed_script.inference_row(FAMILIES["llama"].build(), {"mlp_neurons": 16}, repeats=1)
    assert row["intermediate_sizes"] == [32]
    assert row["ideal_flop_ratio"] > 1
    for key in ("prefill_ms", "decode_b1_ms", "decode_b8_ms"):
        assert row[key]["dense"] > 0 and row[key]["pruned"] > 0
    results = {"settings": {"num_samples": 8, "seq_len": 16, "threads": 1}, "rows": {"inference/tiny-mlp": row}}
    assert "tiny-mlp" in speed_script.table(results)
