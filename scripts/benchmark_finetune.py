"""Issue 5's benchmark: gradual pruning during fine-tuning vs one-shot pruning plus recovery, same budget.

SmolLM2-135M, MLP neurons −50%, causal-LM fine-tuning on 512-token windows of WikiText-2
`wiki.valid.tokens`, 100 optimizer steps × 4 windows, seeds 0 and 1. Rows:

  dense          the unpruned model, no training (reference)
  zero-shot      one-shot prune, no training, every registered criterion (the table shows the best)
  oneshot-full   one-shot prune with the seed's best zero-shot criterion, then the budget as a full fine-tune
  oneshot-lora   the same with LoRA (r=8, every linear layer; adapter on the pruned folder), merged
  oneshot-distill-full   oneshot-full with distillation from the dense model (`--distill-alpha`,
                 `--distill-temperature`; `DistillationCallback`, teacher = a frozen copy of the dense model)
  oneshot-distill-lora   oneshot-lora with the same distillation (the teacher is the dense model, not the
                 pruned base under the adapters)
  gradual        PruningCallback, default schedule (cubic, step 0 → 75% of the steps), `--gradual-score`
                 (`l0` attaches hard-concrete gates first and records their expected kept fraction),
                 full fine-tune of the masked model, compacted at the end
  gradual-repair gradual with `repair="lstsq"`: the consumers of the newly masked groups refitted at every event
  gradual-distill  gradual with `distill=Distillation(alpha, temperature)` (teacher: the unpruned model)
  gradual-both   gradual with both
  callback-oneshot-distill  the callback's one-call path: `PruningCallback(PruningSchedule("oneshot"),
                 distill=...)` runs the zero-shot prune (the seed's best zero-shot criterion, least-squares
                 repair, calibrated on the first training windows) before step 0 and trains the masked model
                 with distillation; cut at the end (one `trainer.train()`)

Every prune uses `--damping` (default: `PruningConfig`'s). Quality: WikiText-2 *test* perplexity
on every non-overlapping `--seq-len` window of the whole split (the zero-shot protocol); `--windows N`
scores the first N only (quick mode). Wall time: pruning + training (`train_s`), evaluation (`eval_s`).
Results go to `--output` (JSON) after every row, with every setting that changes the numbers
(results_file.py); finished rows are skipped when the script runs again with the same settings, and
other settings are refused. Prints the command that reproduces the table above it. A trained row also
saves a Trainer checkpoint every `--save-steps` optimizer steps under `--work` (the newest only): a run
stopped inside a row resumes from it (the same prune first, then `trainer.train(resume_from_checkpoint=...)`,
which restores the weights, optimizer, schedule, RNG and the callback's masks), and a finished row's folder
is removed.

    python scripts/benchmark_finetune.py                              # hours on 2 CPU cores
    python scripts/benchmark_finetune.py --rows gradual --seeds 0
    python scripts/benchmark_finetune.py --rows gradual-both,oneshot-distill-full --steps 400 \
        --output outputs/benchmark_finetune_400.json
    python scripts/benchmark_finetune.py --model tiny --steps 4 --windows-per-step 2 --seq-len 64 --windows 2
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import time
from pathlib import Path

import torch
from results_file import LANGUAGE_MODELS, PACKAGES, language_model, open_results, training_precision
from transformers import Trainer, TrainingArguments

from hf_prune import Distillation, HFPruner, PruningCallback, PruningConfig, PruningSchedule
from hf_prune.calibration.data import data_file, wikitext2_test_text
from hf_prune.criteria import available_criteria
from hf_prune.evaluation import parameter_count, perplexity
from hf_prune.training.recovery import DistillationCallback, lora_for_recovery

ONESHOT_ROWS = ("oneshot-full", "oneshot-lora", "oneshot-distill-full", "oneshot-distill-lora")
GRADUAL_ROWS = ("gradual", "gradual-repair", "gradual-distill", "gradual-both")
#: Callback rows: the gradual schedule and the callback's one-shot schedule at step 0.
CALLBACK_ROWS = (*GRADUAL_ROWS, "callback-oneshot-distill")
ROWS = ("dense", "zero-shot", *ONESHOT_ROWS, *CALLBACK_ROWS)
TARGET = {"mlp_neurons": 0.5}


def windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    count = ids.numel() // seq_len
    return ids[: count * seq_len].view(count, seq_len)


def train(model, data: torch.Tensor, settings: dict, seed: int, learning_rate: float, work: Path, callbacks=()):
    """`settings["steps"]` optimizer steps; a checkpoint every `settings["save_steps"]` into `work`, where the
    newest one a stopped run left is resumed from."""
    rows = [{"input_ids": row, "labels": row} for row in data]
    resumed = sorted(work.glob("checkpoint-*"), key=lambda folder: int(folder.name.rpartition("-")[2]))
    args = TrainingArguments(
        output_dir=str(work),
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["windows_per_step"],
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        seed=seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        save_strategy="steps",
        save_steps=settings["save_steps"],
        save_total_limit=1,
        logging_steps=10,
        disable_tqdm=False,  # a progress bar over the optimizer steps (stderr)
        bf16=settings["precision"] == "bf16",
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks))
    if resumed:
        print(f"resuming from {resumed[-1]}", flush=True)
    return trainer.train(resume_from_checkpoint=str(resumed[-1]) if resumed else None).training_loss


def run_row(row: str, seed: int, dense, tokenizer, data, test_ids, settings: dict, results: dict, work: Path) -> dict:
    """One (row, seed): prune and/or train a copy of the dense model, then measure it."""
    record: dict = {}
    if row == "zero-shot":
        record["eval_s"] = 0.0
        for criterion in settings["zero_shot_criteria"]:
            candidate = copy.deepcopy(dense)
            HFPruner(candidate, tokenizer).prune(**TARGET, criterion=criterion, seed=seed, damping=settings["damping"])
            evaluated = time.perf_counter()
            ppl = perplexity(candidate, test_ids, settings["seq_len"], settings["windows"])
            record["eval_s"] += time.perf_counter() - evaluated
            record[f"perplexity_{criterion}"] = ppl
            if "perplexity" not in record or ppl < record["perplexity"]:
                record.update(criterion=criterion, perplexity=ppl, parameters=parameter_count(candidate))
        record["train_s"] = 0.0
        return record
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    distill = "distill" in row or row == "gradual-both"
    alpha, temperature = settings["distill_alpha"], settings["distill_temperature"]
    if row in ONESHOT_ROWS:
        criterion = results["rows"][f"zero-shot/seed{seed}"]["criterion"]
        record["criterion"] = criterion
        # A frozen copy: the shared dense model must stay trainable for the rows after this one.
        recovery = [DistillationCallback(copy.deepcopy(dense), alpha, temperature)] if distill else []
        pruner = HFPruner(model, tokenizer)
        pruner.prune(**TARGET, criterion=criterion, seed=seed, damping=settings["damping"])
        if not row.endswith("lora"):
            record["train_loss"] = train(pruner.model, data, settings, seed, settings["lr_full"], work, recovery)
            model = pruner.model
        else:
            folder = pruner.save_pretrained(work / "pruned", overwrite=True)
            lora = lora_for_recovery(folder)
            record["train_loss"] = train(lora, data, settings, seed, settings["lr_lora"], work, recovery)
            model = lora.merge_and_unload()
    elif row in CALLBACK_ROWS:
        oneshot = row == "callback-oneshot-distill"
        if oneshot:
            record["criterion"] = results["rows"][f"zero-shot/seed{seed}"]["criterion"]
        else:
            record["score"] = settings["gradual_score"]
        chosen = {"criterion": record["criterion"]} if oneshot else {}
        # the teacher passed, not taken from the model at step 0: a resumed run's model is already masked
        teacher = copy.deepcopy(dense) if distill else None
        config = PruningConfig(**TARGET, damping=settings["damping"], **chosen)
        callback = PruningCallback(
            config,
            schedule=PruningSchedule("oneshot") if oneshot else None,
            score=settings["gradual_score"],
            pruned_dir=None,
            repair="lstsq" if row in ("gradual-repair", "gradual-both") else "none",
            distill=Distillation(alpha=alpha, temperature=temperature, teacher=teacher) if distill else None,
        )
        if callback.score == "l0":
            callback.attach_gates(model)  # before the Trainer builds its optimizer
        record["train_loss"] = train(model, data, settings, seed, settings["lr_full"], work, [callback])
        if callback.penalty is not None:
            record["l0_expected_kept"] = callback.penalty.expected
        model = callback.pruned_model
    record["train_s"] = time.perf_counter() - start
    evaluated = time.perf_counter()
    record["perplexity"] = perplexity(model.eval(), test_ids, settings["seq_len"], settings["windows"])
    record["eval_s"] = time.perf_counter() - evaluated
    record["parameters"] = parameter_count(model)
    return record


def table(results: dict, seeds: list[int], rows: list[str] = ROWS) -> str:
    """Perplexity per seed and the mean of each of `rows`, then whether gradual beats one-shot + recovery."""
    settings = results["settings"]
    lines = [
        f"{settings['model']}, MLP neurons -50%, {settings['steps']} steps × {settings['windows_per_step']} windows; "
        f"WikiText-2 test perplexity, {settings['windows']} × {settings['seq_len']}-token windows",
        f"{'row':22}" + "".join(f"{'ppl seed' + str(s):>14}" for s in seeds) + f"{'mean':>10}{'train s':>10}  method",
    ]
    means = {}
    for row in [r for r in ROWS if r in rows]:
        records = [results["rows"].get(f"{row}/seed{s}") for s in seeds]
        if not any(records):
            continue
        done = [r for r in records if r]
        means[row] = statistics.mean(r["perplexity"] for r in done)
        method = done[0].get("criterion") or done[0].get("score") or ""
        cells = "".join(f"{r['perplexity']:>14.2f}" if r else f"{'-':>14}" for r in records)
        train_s = statistics.mean(r["train_s"] for r in done)
        lines.append(f"{row:22}{cells}{means[row]:>10.2f}{train_s:>10.0f}  {method}")
    oneshot = {row: means[row] for row in ONESHOT_ROWS if row in means}
    gradual = {row: means[row] for row in CALLBACK_ROWS if row in means}
    if gradual and oneshot:
        best_row, best = min(oneshot.items(), key=lambda item: item[1])
        callback_row, mean = min(gradual.items(), key=lambda item: item[1])
        gap = mean - best
        verdict = "beats" if gap < 0 else "does not beat"
        lines.append(
            f"\nthe best callback row ({callback_row}) {verdict} the best one-shot + recovery ({best_row}): mean "
            f"perplexity {mean:.2f} vs {best:.2f} ({gap:+.2f}, {100 * gap / best:+.1f}%) at the same "
            f"{settings['steps']} steps."
        )
    if "dense" in means:
        ratios = ", ".join(f"{row} {means[row] / means['dense']:.2f}×" for row in means if row not in ("dense",))
        lines.append(f"perplexity over dense: {ratios}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=LANGUAGE_MODELS, default="smollm2")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every trained row")
    parser.add_argument("--windows-per-step", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--windows",
        "--eval-windows",
        type=int,
        default=None,
        help="evaluate the first N test windows only (quick mode); default: the whole WikiText-2 test split",
    )
    parser.add_argument("--damping", type=float, default=PruningConfig.damping, help="every prune's ridge")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-lora", type=float, default=2e-4)
    parser.add_argument("--gradual-score", default="taylor")
    parser.add_argument("--distill-alpha", type=float, default=0.5, help="α of the distillation rows")
    parser.add_argument("--distill-temperature", type=float, default=1.0, help="T of the distillation rows")
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="training precision; auto: bf16 autocast where the device computes bf16 natively (a CUDA GPU "
        "with bf16, a CPU with avx512_bf16 or amx_bf16: half the step time), fp32 elsewhere (emulated bf16 "
        "is many times slower); the settings record the resolved value; evaluation is fp32",
    )
    parser.add_argument(
        "--zero-shot-criteria",
        default="obs",
        help=f"comma-separated criteria tried for the zero-shot row (of {', '.join(available_criteria())}); "
        "obs is the best one-pass MLP -50%% criterion of scripts/benchmark_zero_shot.py",
    )
    parser.add_argument("--output", default="outputs/benchmark_finetune.json")
    parser.add_argument(
        "--work",
        default=None,
        help="where trained rows keep their checkpoints until they finish (default: beside --output, <output>.work/)",
    )
    parser.add_argument(
        "--save-steps", type=int, default=10, help="a trained row's checkpoint interval (resume after a stop)"
    )
    args = parser.parse_args(argv)
    if args.save_steps < 1:
        parser.error(f"--save-steps must be a positive number of optimizer steps, got {args.save_steps}")
    torch.set_num_threads(args.threads)

    rows = [row for row in args.rows.split(",") if row]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    # Seeds are not a setting: each row is keyed by its seed, so `--seeds 0` and `--seeds 0,1` share a file.
    seeds = [int(seed) for seed in args.seeds.split(",")]
    loaded = language_model(args.model, seed=0)
    dense, tokenizer = loaded.model, loaded.tokenizer
    data = windows(tokenizer, data_file("wikitext-2/wiki.valid.tokens").read_text(encoding="utf-8"), args.seq_len)
    test_ids = tokenizer(wikitext2_test_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = test_ids.numel() // args.seq_len
    settings = {
        "model": args.model,
        "target": TARGET,
        "training_data": "wikitext2 valid",
        "steps": args.steps,
        "windows_per_step": args.windows_per_step,
        "seq_len": args.seq_len,
        "windows": available if args.windows is None else min(args.windows, available),  # evaluated
        "lr_full": args.lr_full,
        "lr_lora": args.lr_lora,
        "gradual_score": args.gradual_score,
        "distill_alpha": args.distill_alpha,
        "distill_temperature": args.distill_temperature,
        "precision": training_precision(args.precision),
        "zero_shot_criteria": args.zero_shot_criteria.split(","),
        "damping": args.damping,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": args.threads,
    }
    results = open_results(args.output, settings, __file__, argv, parser, (*PACKAGES, "peft"))
    if any("oneshot" in row for row in rows) and "zero-shot" not in rows:
        rows.insert(0, "zero-shot")  # the one-shot rows use each seed's best zero-shot criterion
    # Checkpoints are not a setting: a resumed row computes what an uninterrupted one does.
    scratch = Path(args.work) if args.work else Path(args.output).with_suffix(".work")
    run_settings = {**settings, "save_steps": args.save_steps}
    # Seed-major order: an interrupted run leaves whole seeds, which already compare the rows.
    for seed in seeds:
        for row in [r for r in ROWS if r in rows and not (r == "dense" and seed != seeds[0])]:
            key = f"{row}/seed{seed}"
            if key in results:
                continue
            print(f"running {key} ...", flush=True)
            work = scratch / row / f"seed{seed}"
            record = run_row(row, seed, dense, tokenizer, data, test_ids, run_settings, results.as_dict(), work)
            results.save_row(key, record)
            shutil.rmtree(work, ignore_errors=True)
    if scratch.is_dir() and not any(scratch.rglob("checkpoint-*")):
        shutil.rmtree(scratch, ignore_errors=True)
    results.report(table(results.as_dict(), seeds, rows))
    return results.as_dict()


if __name__ == "__main__":
    main()
