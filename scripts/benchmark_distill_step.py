"""Issue 18's cost check: the step time of `PruningCallback` training with distillation against without.

The same model, data and schedule (MLP neurons −50 %, taylor, cubic from step 0), `--steps` optimizer
steps of `--batch` windows of `--seq-len` tokens of WikiText-2 (`wiki.valid.tokens`, the split the
fine-tuning benchmark trains on), full fine-tuning or `--lora`. Each step's wall time is taken between
`on_step_begin` and `on_step_end`; the first `--warmup` steps are left out. Prints the median step
time of both runs and their ratio (the issue's goal: ≤ 1.5×).

    python scripts/benchmark_distill_step.py --model smollm2 --steps 4 --batch 4 --seq-len 256
    python scripts/benchmark_distill_step.py --model tiny --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from results_file import LANGUAGE_MODELS, language_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_prune import Distillation, PruningCallback, PruningConfig
from hf_prune.calibration.data import data_file


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def step_times(args, distill: bool, rows: list[dict]) -> list[float]:
    model = language_model(args.model).model
    if args.lora:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    timer = StepTimer()
    pruning = PruningCallback(
        PruningConfig(mlp_neurons=0.5), distill=Distillation() if distill else None, compact_at_end=False
    )
    with tempfile.TemporaryDirectory() as work:
        training = TrainingArguments(
            output_dir=work,
            max_steps=args.steps + args.warmup,
            per_device_train_batch_size=args.batch,
            learning_rate=1e-5,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
            bf16=args.bf16,
            use_cpu=not torch.cuda.is_available(),
        )
        Trainer(model=model, args=training, train_dataset=rows, callbacks=[pruning, timer]).train()
    return timer.times[args.warmup :]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=LANGUAGE_MODELS, default="smollm2")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lora", action="store_true", help="a LoRA student (its own base is the teacher)")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)
    tokenizer = language_model(args.model).tokenizer
    text = data_file("wikitext-2/wiki.valid.tokens").read_text(encoding="utf-8")
    ids = tokenizer(text[:2_000_000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    count = (args.steps + args.warmup) * args.batch
    windows = ids[: count * args.seq_len].view(count, args.seq_len)
    rows = [{"input_ids": row, "labels": row} for row in windows]
    plain, distilled = step_times(args, False, rows), step_times(args, True, rows)
    result = {
        "plain_s": statistics.median(plain),
        "distill_s": statistics.median(distilled),
        "ratio": statistics.median(distilled) / statistics.median(plain),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
    }
    print(
        f"{args.model}{' LoRA' if args.lora else ''}, {args.batch}×{args.seq_len} tokens, {result['device']}: "
        f"plain {result['plain_s']:.3f} s/step, distill {result['distill_s']:.3f} s/step, "
        f"ratio {result['ratio']:.2f}× (median of {args.steps} steps)"
    )
    return result


if __name__ == "__main__":
    main()
