"""Run under `torchrun --nproc_per_node 2`: trains a tiny llama with PruningCallback on CPU (gloo) and
writes what every process masked, for tests/test_callback.py to compare. `job.py OUTPUT repair` adds
`repair="lstsq"` and records the consumer weights (tests/test_event_repair.py)."""

import json
import sys
from pathlib import Path

import torch
from tiny_models import FAMILIES
from transformers import Trainer, TrainingArguments

from hf_prune import PruningConfig
from hf_prune.training.callback import PruningCallback
from hf_prune.training.schedule import PruningSchedule

torch.set_num_threads(1)
output = Path(sys.argv[1])
repair = "lstsq" if sys.argv[2:] == ["repair"] else "none"
generator = torch.Generator().manual_seed(0)
rows = [{"input_ids": (ids := torch.randint(3, 97, (12,), generator=generator)), "labels": ids} for _ in range(16)]
pruning = PruningCallback(
    PruningConfig(attention_heads=0.5, mlp_neurons=0.5, layers=1),
    PruningSchedule("cubic", start_step=1, end_step=3),
    compact_at_end=False,
    repair=repair,
)
args = TrainingArguments(
    output_dir=str(output),
    max_steps=4,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    learning_rate=1e-2,
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    logging_strategy="no",
    disable_tqdm=True,
    seed=0,
)
trainer = Trainer(model=FAMILIES["llama"].build(), args=args, train_dataset=rows, callbacks=[pruning])
trainer.train()
rank = trainer.args.process_index
# Totals are synchronized at every pruning event; pending sums (since the last one) are per process.
totals = {name: value.tolist() for name, value in pruning._scores.total.items()}
pending = {name: value.tolist() for name, value in pruning._scores.pending.items()}
plan = [p.to_dict() for p in pruning.plan.layers]
record = {"world_size": trainer.args.world_size, "plan": plan, "totals": totals, "pending": pending}
if repair != "none":
    layers = trainer.model.model.layers
    record["consumers"] = [
        [layer.self_attn.o_proj.weight.tolist(), layer.mlp.down_proj.weight.tolist()] for layer in layers
    ]
(output / f"rank{rank}.json").write_text(json.dumps(record))
# Both processes must finish writing before either tears gloo down; a lone teardown aborts the other.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
