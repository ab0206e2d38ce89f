"""Measurements of a model: measures.py (perplexity under the project's WikiText-2 protocol, parameter and
FLOP counts, latency, image top-1), harness.py (lm-evaluation-harness tasks on the in-memory model, beside
the perplexity protocol as the pseudo-task `wikitext2_ppl`), local_tasks.py (the offline tasks built from
the WikiText-2 test text, whose YAML files ship in tasks/)."""

from .harness import PERPLEXITY_TASK, TaskScore, evaluate_tasks
from .local_tasks import LOCAL_TASKS, local_task_names
from .measures import (
    FLOPS_CONTEXT,
    WIKITEXT2_CONFIG,
    WIKITEXT2_DATASET,
    flops_per_token,
    image_flops,
    latency_ms,
    parameter_count,
    perplexity,
    top1_accuracy,
    top1_of_pixels,
    wikitext2_perplexity,
    wikitext2_protocol,
)

__all__ = [
    "FLOPS_CONTEXT",
    "LOCAL_TASKS",
    "PERPLEXITY_TASK",
    "WIKITEXT2_CONFIG",
    "WIKITEXT2_DATASET",
    "TaskScore",
    "evaluate_tasks",
    "flops_per_token",
    "image_flops",
    "latency_ms",
    "local_task_names",
    "parameter_count",
    "perplexity",
    "top1_accuracy",
    "top1_of_pixels",
    "wikitext2_perplexity",
    "wikitext2_protocol",
]
