"""`PruningCallback(config, PruningSchedule("oneshot"))`: the zero-shot prune at step 0, then training, in one
`trainer.train()`. After step 0 the masked model computes what `HFPruner(...).prune()` cuts on the same
calibration windows; training then moves the weights; the checkpoint saved at the end is the cut model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_callback import arguments, dataset, logits
from tiny_models import FAMILIES
from transformers import Trainer, TrainerCallback

from hf_prune import PruningCallback, PruningConfig, load_pruned
from hf_prune.errors import UsageError
from hf_prune.pruner import HFPruner
from hf_prune.training.schedule import PruningSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

# Calibration-based defaults (criterion and lstsq repair) on the first 8 training rows.
CONFIG = PruningConfig(kv_groups=1, mlp_neurons=0.5, num_samples=8, batch_size=4)
INPUTS = FAMILIES["llama"].inputs()


class AtStart(TrainerCallback):
    """After the PruningCallback's on_train_begin: the masked model's logits (and the teacher's)."""

    def __init__(self, pruning: PruningCallback):
        self.pruning = pruning

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.logits = logits(model, INPUTS)
        model.train()
        distiller = self.pruning._distiller
        self.teacher_logits = logits(distiller.teacher, INPUTS) if distiller is not None else None
        self.weights = {name: p.detach().clone() for name, p in model.named_parameters()}


def test_oneshot_at_step_zero_equals_the_zero_shot_prune_then_trains_and_saves_the_cut_model(tmp_path):
    rows = dataset()
    windows = [torch.stack([row["input_ids"] for row in rows[: CONFIG.num_samples]])]
    dense = FAMILIES["llama"].build()
    dense_logits = logits(dense, INPUTS)
    reference = HFPruner(dense)
    report = reference.prune(replace(CONFIG, calibration=windows))
    expected = logits(reference.model, INPUTS)

    pruning = PruningCallback(CONFIG, PruningSchedule("oneshot"), distill=True)
    start = AtStart(pruning)
    trainer = Trainer(
        model=FAMILIES["llama"].build(),
        args=arguments(tmp_path, max_steps=2, learning_rate=1e-3),
        train_dataset=rows,
        callbacks=[pruning, start],
    )
    trainer.train()

    torch.testing.assert_close(start.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(start.teacher_logits, dense_logits, atol=1e-6, rtol=0)  # the dense teacher
    assert [p.to_dict() for p in pruning.plan.layers] == [p.to_dict() for p in reference.plan.layers]
    cut = trainer.model
    assert cut is pruning.pruned_model
    assert sum(p.numel() for p in cut.parameters()) == report.parameters_after
    assert not torch.allclose(logits(cut, INPUTS), expected, atol=1e-4)  # two steps of training moved it
    saved = load_pruned(tmp_path / "pruned")
    assert sum(p.numel() for p in saved.parameters()) == report.parameters_after
    torch.testing.assert_close(logits(saved, INPUTS), logits(cut, INPUTS), atol=1e-5, rtol=0)
    assert pruning.report.calibration is not None


def test_oneshot_takes_a_given_calibration_source(tmp_path):
    windows = [torch.randint(3, 97, (8, 16), generator=torch.Generator().manual_seed(5))]
    reference = HFPruner(FAMILIES["llama"].build())
    reference.prune(replace(CONFIG, calibration=windows))
    pruning = PruningCallback(CONFIG, PruningSchedule("oneshot"), calibration=windows, pruned_dir=None)
    start = AtStart(pruning)
    trainer = Trainer(
        model=FAMILIES["llama"].build(),
        args=arguments(tmp_path, max_steps=1, learning_rate=0.0),
        train_dataset=dataset(),
        callbacks=[pruning, start],
    )
    trainer.train()
    torch.testing.assert_close(start.logits, logits(reference.model, INPUTS), atol=1e-5, rtol=0)


def test_oneshot_refusals_name_the_fix():
    with pytest.raises(UsageError, match=r"drop score='l0', or start the schedule later"):
        PruningCallback(CONFIG, PruningSchedule("oneshot"), score="l0")
