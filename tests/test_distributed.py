"""Calibration split across two torchrun CPU processes prunes and saves what one process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

JOB = Path(__file__).with_name("ddp_prune_job.py")


def _run(command: list[str], output: Path) -> list[dict]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.run(
        [*command, str(JOB), str(output)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        cwd=JOB.parent,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return [json.loads(path.read_text()) for path in sorted(output.glob("rank*.json"))]


def test_two_processes_save_the_weights_of_one(tmp_path):
    """Each process calibrates on half the batches; the summed statistics give every process the same
    plan and the saved checkpoint equals the single-process one. Tolerance: the statistics differ only
    in the order of float64 additions (~1e-16 relative), which the float32 weights cannot show beyond
    the least-squares solve's rounding, so rtol 1e-5 / atol 1e-6 (bitwise equal when measured)."""
    single = _run([sys.executable], tmp_path / "single")
    ranks = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], tmp_path / "torchrun")
    assert single[0]["world_size"] == 1
    assert [r["world_size"] for r in ranks] == [2, 2]
    # moments, Grams, influence; gradients; routing; removal errors and co-routing (output_error, merge)
    for name in ("default", "taylor", "experts", "expert_merge"):
        assert ranks[0][name]["plan"] == ranks[1][name]["plan"] == single[0][name]["plan"]
        assert ranks[0][name]["calibration"] == single[0][name]["calibration"]  # all 12 windows counted once
        expected = load_file(tmp_path / "single" / name / "model.safetensors")
        saved = load_file(tmp_path / "torchrun" / name / "model.safetensors")
        assert saved.keys() == expected.keys()
        for key, tensor in expected.items():
            torch.testing.assert_close(saved[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    written = sorted(p.name for p in (tmp_path / "torchrun").iterdir())
    assert written == [
        "default",
        "expert_merge",
        "experts",
        "rank0.json",
        "rank1.json",
        "taylor",
    ]  # one checkpoint per prune, by rank 0
