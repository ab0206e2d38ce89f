"""Downstream tasks through lm-evaluation-harness (`lm-eval`, Gao et al., 2024) on the model in memory.

`evaluate_tasks(model, tokenizer, ["wikitext2_ppl", "wikitext2_lastword", "hellaswag"])` wraps the model in the
harness's own `HFLM(pretrained=model, tokenizer=tokenizer)` and runs `simple_evaluate`: prompts, requests,
filters and metrics are the harness's. Task names are any the harness knows (their data comes from the Hub),
the offline tasks of `local_tasks.py` (built from the WikiText-2 test text), and the pseudo-task
`wikitext2_ppl`: the project's perplexity protocol (`measures.wikitext2_perplexity`), not a harness task.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..errors import MissingDependencyError, UnknownTaskError
from .local_tasks import LOCAL_TASKS, TASKS_DIR, local_task_names
from .measures import WIKITEXT2_CONFIG, WIKITEXT2_DATASET, wikitext2_perplexity, wikitext2_protocol

#: The project's WikiText-2 perplexity protocol as a task name.
PERPLEXITY_TASK = "wikitext2_ppl"
INSTALL_HINT = 'pip install "hf_prune[eval]"'


@dataclass(frozen=True)
class TaskScore:
    """One number one task gave, with what the model-index needs to describe it."""

    task: str
    metric: str  # the harness's metric key ("acc", "acc_norm", "perplexity", ...)
    value: float
    stderr: float | None  # the harness's standard error, when it computed one
    higher_is_better: bool
    examples: int  # examples scored (512-token windows for wikitext2_ppl)
    protocol: str  # how it was measured, in one line
    dataset: str | None = None  # Hub id of the data (None: built locally, the model-index type "custom")
    dataset_name: str | None = None
    dataset_config: str | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def require_harness():
    """The `lm_eval` module, or a typed error naming the extra that installs it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 (the part evaluate_tasks needs)
    except ImportError as error:
        raise MissingDependencyError(
            f"task evaluation needs lm-evaluation-harness, which is not installed ({error}): {INSTALL_HINT}"
        ) from error
    return lm_eval


@functools.lru_cache(maxsize=4)
def indexed_tasks(paths: tuple[str, ...], include_defaults: bool):
    """One `TaskManager` per set of task folders for the whole process: the CLI checks the names, then
    scores two models, on one index."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """A `TaskManager` that knows the local tasks (and `include_path`'s); the harness's own task index
    (about 15,000 YAML files, seconds to read) only when a task is not local. Unknown names are refused."""
    require_harness()
    local = set(local_task_names())
    paths = (str(TASKS_DIR), *([str(include_path)] if include_path else []))
    manager = indexed_tasks(paths, include_defaults=not set(tasks) <= local)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UnknownTaskError(
            f"unknown task {', '.join(map(repr, unknown))} (argument `tasks`, CLI --tasks): use "
            f"{PERPLEXITY_TASK}, a local task ({', '.join(sorted(local))}) or a task lm-evaluation-harness "
            "knows (`lm-eval ls tasks` lists them; their data needs the Hub)."
        )
    return manager


def run_harness(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> dict:
    """`lm_eval.simple_evaluate` on the in-memory model: the harness's results dict as it returns it
    (`results`, `n-samples`, `configs`, and per-example `samples` when `log_samples`)."""
    manager = task_manager(tasks, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def scores_of(results: dict, batch_size: int) -> list[TaskScore]:
    """Every metric of every task (and group) in a harness results dict, as `TaskScore`s."""
    import lm_eval

    scores = []
    for task, metrics in results["results"].items():
        config = results.get("configs", {}).get(task, {})
        counts = results.get("n-samples", {}).get(task, {})
        examples = counts.get("effective", 0)
        version = results.get("versions", {}).get(task)
        shots = config.get("num_fewshot", 0)
        original = counts.get("original")
        of = f" of {original}" if original not in (None, examples) else ""
        named = f"task {task}" + (f" v{version}" if version is not None else "")
        protocol = (
            f"lm-evaluation-harness {lm_eval.__version__}, {named}, {shots}-shot, {examples}{of} examples, "
            f"batch {batch_size}"
        )
        if task in LOCAL_TASKS:
            # Not a Hub data set: the model-index type "custom", told apart by the task as its config
            # (huggingface_hub groups results by type, config and split).
            data = {"dataset": None, "dataset_name": LOCAL_TASKS[task][1], "dataset_config": task, "split": "test"}
            protocol += f", built offline from the {WIKITEXT2_DATASET} {WIKITEXT2_CONFIG} test split"
        else:
            data = {
                "dataset": config.get("dataset_path"),
                "dataset_name": task,
                "dataset_config": config.get("dataset_name"),
                "split": config.get("test_split") or config.get("validation_split"),
            }
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            known = results.get("higher_is_better", {}).get(task, {})
            if metric not in known or _number(value) is None:  # alias, stderrs, sample_len
                continue
            scores.append(
                TaskScore(
                    task=task,
                    metric=metric,
                    value=float(value),
                    stderr=_number(metrics.get(f"{metric}_stderr,{_filter}")),
                    higher_is_better=bool(known[metric]),
                    examples=int(examples),
                    protocol=protocol,
                    **data,
                )
            )
    return scores


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | str,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    windows: int = 80,
    seq_len: int = 512,
    include_path: str | Path | None = None,
) -> list[TaskScore]:
    """Score `model` on `tasks` (a list, or names separated by commas); one `TaskScore` per metric.

    `limit` caps the examples of each harness task (a fraction below 1 is a share of them); `wikitext2_ppl`
    scores `windows` windows of `seq_len` tokens instead (the protocol: 80 × 512). Needs `lm-eval` for any
    task but `wikitext2_ppl` (`pip install "hf_prune[eval]"`).
    """
    names = [task.strip() for task in (tasks.split(",") if isinstance(tasks, str) else tasks) if task.strip()]
    if not names:
        raise UnknownTaskError(f"no task given (argument `tasks`, CLI --tasks): name {PERPLEXITY_TASK} or a task.")
    harness_tasks = [task for task in dict.fromkeys(names) if task != PERPLEXITY_TASK]
    scores = []
    if PERPLEXITY_TASK in names:
        value = wikitext2_perplexity(model.eval(), tokenizer, windows, seq_len)
        scores.append(
            TaskScore(
                task=PERPLEXITY_TASK,
                metric="perplexity",
                value=value,
                stderr=None,
                higher_is_better=False,
                examples=windows,
                protocol=wikitext2_protocol(windows, seq_len),
                dataset=WIKITEXT2_DATASET,
                dataset_name="WikiText-2",
                dataset_config=WIKITEXT2_CONFIG,
                split="test",
            )
        )
    if harness_tasks:
        results = run_harness(
            model,
            tokenizer,
            harness_tasks,
            limit=limit,
            batch_size=batch_size,
            num_fewshot=num_fewshot,
            include_path=include_path,
        )
        scores += scores_of(results, batch_size)
    return scores
