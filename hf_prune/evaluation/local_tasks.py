"""Offline lm-evaluation-harness tasks built from the WikiText-2 test text under `$HF_PRUNE_DATA_DIR`.

The harness's own tasks download their data from the Hub. These two run from local files: their YAML
files ship in `tasks/` (package data) and the harness reads them through `TaskManager(include_path=...)`;
each YAML's `custom_dataset` calls the builder below, which writes the examples once, deterministically,
into `cache_root()/eval_tasks/TASK-HASH/test.jsonl` (HASH: the source text and `BUILD_VERSION`), then hands
the harness a `datasets` split read from that file. Prompts, scoring and metrics are the harness's.

- `wikitext2_lastword`: LAMBADA-style (Paperno et al., 2016) last-word prediction. Each body paragraph
  that ends in `WORD.`, where WORD is alphabetic, at least 3 letters long and already used earlier in the
  paragraph (as the target of most LAMBADA passages is), gives the context "everything before WORD" and
  the target " WORD". `output_type: loglikelihood`: `acc` is 1 when WORD is the greedy continuation
  (every token the argmax), `perplexity` is exp(−mean log p(target | context)) over examples.
- `wikitext2_nextsentence`: four-way next-sentence choice (in the spirit of HellaSwag, Zellers et al., 2019).
  The context is up to 4 consecutive sentences of a paragraph; the choices are the sentence that follows
  and 3 sentences drawn from other paragraphs of the same article (same topic, distinct, none equal to
  the answer). `acc` takes the choice with the highest log-likelihood, `acc_norm` the highest per byte.

Text is the raw test split, one paragraph per line, detokenized by the harness's own WikiText
detokenizer (`lm_eval.tasks.wikitext.preprocess_wikitext`); examples are shuffled with a fixed seed, so
`--limit N` scores N examples spread over the split.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from ..calibration.data import wikitext2_test_text
from ..calibration.images import cache_root
from ..output.atomic import write_atomically

#: The folder of task YAML files the harness indexes (`TaskManager(include_path=TASKS_DIR)`).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
#: Bumped whenever the builders change what they write; part of the cache key.
BUILD_VERSION = 1
SEED = 1234
CHOICES = 4
MAX_CONTEXT_SENTENCES = 4
MIN_CONTEXT_WORDS = 20
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["A-Z])')
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})\.$", re.DOTALL)


def wikitext2_articles() -> list[list[str]]:
    """The raw WikiText-2 test split as articles (split at each top-level ` = Title = ` heading), each a list
    of its body paragraphs, detokenized (` @-@ ` → `-`, ` , ` → `, `, ...) by the harness's detokenizer."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    articles: list[list[str]] = []
    for line in wikitext2_test_text().split("\n"):
        line = line.strip()
        if re.fullmatch(r"= [^=].* =", line):
            articles.append([])
        elif line and not line.startswith("=") and articles:
            # The trailing space lets the detokenizer's " . " rule reach the paragraph's last full stop.
            articles[-1].append(wikitext_detokenizer({"page": line + " "}).strip())
    return [paragraphs for paragraphs in articles if paragraphs]


def lastword_examples(articles: list[list[str]]) -> list[dict]:
    """{"context", "target"} per qualifying paragraph (see the module docstring), shuffled with `SEED`."""
    examples = []
    for paragraphs in articles:
        for paragraph in paragraphs:
            match = _LAST_WORD.match(paragraph)
            if match is None:
                continue
            context, word = match["context"], match["word"]
            if len(context.split()) < MIN_CONTEXT_WORDS or word not in re.findall(r"[A-Za-z]+", context):
                continue
            examples.append({"context": context, "target": word})
    random.Random(SEED).shuffle(examples)
    return examples


def nextsentence_examples(articles: list[list[str]]) -> list[dict]:
    """{"context", "choices", "label"} per paragraph of 2+ sentences whose article has 3 other candidate
    sentences (see the module docstring); the answer's position is drawn with `SEED`, then shuffled."""
    rng = random.Random(SEED)
    examples = []
    for paragraphs in articles:
        sentences = [_SENTENCE_END.split(paragraph) for paragraph in paragraphs]
        for index, own in enumerate(sentences):
            if len(own) < 2:
                continue
            answer = own[-1]
            context = " ".join(own[-1 - MAX_CONTEXT_SENTENCES : -1])
            others = sorted(
                {s for i, group in enumerate(sentences) if i != index for s in group if s != answer and s.strip()}
            )
            if len(others) < CHOICES - 1 or len(context.split()) < MIN_CONTEXT_WORDS:
                continue
            choices = rng.sample(others, CHOICES - 1)
            label = rng.randrange(CHOICES)
            choices.insert(label, answer)
            examples.append({"context": context, "choices": choices, "label": label})
    rng.shuffle(examples)
    return examples


def check_examples(task: str, examples: list[dict]) -> None:
    """Refuse malformed examples: an empty context or target, or choices that are empty or not distinct."""
    if not examples:
        raise ValueError(f"{task}: no examples were built from the WikiText-2 test text")
    for number, example in enumerate(examples):
        texts = [example["context"], *(example.get("choices") or [example.get("target")])]
        if not all(isinstance(text, str) and text.strip() for text in texts):
            raise ValueError(f"{task}: example {number} has an empty context, target or choice: {example}")
        choices = example.get("choices")
        if choices is not None and (len(set(choices)) != len(choices) or not 0 <= example["label"] < len(choices)):
            raise ValueError(f"{task}: example {number} has repeated choices or a label out of range: {example}")


#: task name → (builder, what the model-index names the data set).
LOCAL_TASKS = {
    "wikitext2_lastword": (lastword_examples, "WikiText-2 last word (hf_prune)"),
    "wikitext2_nextsentence": (nextsentence_examples, "WikiText-2 next sentence, 4 choices (hf_prune)"),
}


def local_task_names() -> list[str]:
    return sorted(LOCAL_TASKS)


def build_task_file(task: str) -> Path:
    """The task's `test.jsonl`, built on first use into a cache folder keyed by a hash of the source text."""
    builder, _ = LOCAL_TASKS[task]
    text = wikitext2_test_text()
    key = hashlib.sha256(f"{task} {BUILD_VERSION}\n{text}".encode()).hexdigest()[:16]
    folder = cache_root() / "eval_tasks" / f"{task}-{key}"
    if (folder / "test.jsonl").is_file():
        return folder / "test.jsonl"
    examples = builder(wikitext2_articles())
    check_examples(task, examples)

    def write(staging: Path) -> None:
        with open(staging / "test.jsonl", "w", encoding="utf-8") as handle:
            for example in examples:
                handle.write(json.dumps(example, ensure_ascii=False) + "\n")

    return write_atomically(folder, write, overwrite=True) / "test.jsonl"


def _dataset(task: str):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(build_task_file(task))})


def lastword_dataset(**metadata):
    """`custom_dataset` of tasks/wikitext2_lastword.yaml (the harness passes the task metadata)."""
    return _dataset("wikitext2_lastword")


def nextsentence_dataset(**metadata):
    """`custom_dataset` of tasks/wikitext2_nextsentence.yaml."""
    return _dataset("wikitext2_nextsentence")
