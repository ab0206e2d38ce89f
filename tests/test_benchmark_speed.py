"""scripts/benchmark_speed.py's measurements on a tiny Llama: the stages add up to the prune, the dense
model is left as it was, the inference rows compare dense and pruned, the table prints this command's
rows below the command that reproduces them, repeats resume and other settings are refused."""

import json

import pytest
from script_modules import script_module
from tiny_models import FAMILIES, calibration_windows

from hf_prune import PruningConfig
from hf_prune.evaluation import parameter_count


@pytest.fixture(scope="module")
def speed_script():
    return script_module("benchmark_speed")


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
    settings = {"num_samples": 8, "seq_len": 16, "threads": 1, "inference_repeats": 1}
    results = {"settings": settings, "rows": {"inference/tiny-mlp": row, "inference/other": row}}
    text = speed_script.table(results, ["inference/tiny-mlp"])
    assert "tiny-mlp" in text and "other" not in text and "medians of 1 interleaved" in text


def test_main_resumes_repeats_and_refuses_other_settings(
    speed_script, one_thread, smollm2, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "speed.json"
    argv = [
        "--model",
        "tiny",
        "--part",
        "prune",
        "--configs",
        "default",
        "--num-samples",
        "4",
        "--seq-len",
        "32",
        "--threads",
        "1",
        "--output",
        str(output),
    ]
    calls = []
    prune_row = speed_script.prune_row

    def counted(*args):
        calls.append(args)
        return prune_row(*args)

    monkeypatch.setattr(speed_script, "prune_row", counted)
    speed_script.main([*argv, "--repeats", "1"])
    assert len(calls) == 1
    capsys.readouterr()
    results = speed_script.main([*argv, "--repeats", "2"])  # one more repeat: one more prune
    assert len(calls) == 2
    assert sorted(results["rows"]) == ["prune/default/0", "prune/default/1"]
    assert json.loads(output.read_text())["rows"] == results["rows"]
    printed = capsys.readouterr().out
    assert f"\npython scripts/benchmark_speed.py {' '.join(argv)} --repeats 2\n" in printed
    assert "4 × 32 calibration tokens, 2 repeat(s), 1 thread(s)" in printed

    speed_script.main([*argv, "--repeats", "1"])  # the table shows this command's repeat only
    assert "2 repeat(s)" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        speed_script.main([*argv, "--repeats", "1", "--inference-repeats", "2"])
    assert "inference_repeats: 5 in the file, 2 here" in capsys.readouterr().err
