"""Run under `torchrun --nproc_per_node 2` (or alone for the single-process reference): prunes a tiny
llama with calibration split across the processes and saves it, for tests/test_distributed.py to compare."""

import json
import sys
from pathlib import Path

import torch
import transformers
from tiny_models import FAMILIES, calibration_windows

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.distributed import process_state
from hf_prune.derivation.derive import build_tiny

torch.set_num_threads(1)
output = Path(sys.argv[1])
state = process_state()
rank, world_size = (state.process_index, state.num_processes) if state else (0, 1)
# Each prune draws on moments and Grams (obs + lstsq), influence (block_influence) and gradients (taylor).
# 12 windows in batches of 2: 6 batches, 3 per process.
calibration = {"calibration": calibration_windows(12, 16), "num_samples": 12, "seq_len": 16, "batch_size": 2}
configs = {
    "default": PruningConfig(kv_groups=1, mlp_neurons=0.5, layers=1, **calibration),
    "taylor": PruningConfig(mlp_neurons=0.25, attention_heads=1, criterion="taylor", **calibration),
    # routing statistics (REAP, the default for experts) on a tiny Mixtral
    "experts": PruningConfig(experts=1, mlp_neurons=0.25, criterion={"neurons": "magnitude"}, **calibration),
    # removal errors (output_error) and co-routing counts (the merge repair)
    "expert_merge": PruningConfig(
        experts=1, criterion={"experts": "output_error"}, expert_repair="merge", reconstruct="none", **calibration
    ),
}
record = {"world_size": world_size}
for name, config in configs.items():
    moe = name.startswith("expert")
    model = build_tiny(transformers.MixtralConfig, seed=3)[0] if moe else FAMILIES["llama"].build()
    pruner = HFPruner(model)
    report = pruner.prune(config)
    pruner.save_pretrained(output / name)
    record[name] = {"plan": [layer.to_dict() for layer in pruner.plan.layers], "calibration": report.calibration}
(output / f"rank{rank}.json").write_text(json.dumps(record))
if state is not None:
    # Both processes must finish writing before either tears gloo down; a lone teardown aborts the other.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
