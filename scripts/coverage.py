"""Coverage sweep (issue 15): every model type of the installed transformers with a causal-LM, masked-LM,
sequence-classification or image-classification class, pruned, saved and reloaded in a fresh process.

    python scripts/coverage.py [--output outputs/coverage.json] [--markdown docs/coverage.md]
                               [--tasks causal-lm,masked-lm,...] [--time-limit 60] [model_type ...]
    python scripts/coverage.py --derive-only [--json out.json] [model_type ...]   # scripts/derived_sweep.py

For each type, its first class in the order causal LM, masked LM, sequence classification, image
classification gets a tiny random instance by the generic shrink rule (`hf_prune.derivation.derive.build_tiny`,
no per-type configs). Its adapter is the one `HFPruner` takes (hand-written, else derived and verified); a
type with none is traced (`channels`). For every kind the adapter verifies, and one combined plan (heads,
neurons, layers and channels, whichever apply): prune (magnitude, no repair) → cut == masked (1e-5) → save
→ reload in a fresh process → logits equal (1e-5). A kind *round-trips* when all of this holds.

Isolation: the pruning runs in a worker process and each reload in one of two others that never prune:
vanilla folders load in one that never imports hf_prune (plain transformers, asserted), loader-format and
traced folders with `hf_prune.load_pruned` in the other. Workers are reused across types (importing
hf_prune takes seconds); one that passes its time limit or dies is killed and replaced, and the type is
recorded as timed out. Results are resumable (`scripts/results_file.py`: rows keyed by model type, the file
bound to every setting); the markdown table groups the totals by task class and by block family
(attention + MLP, attention + mixture-of-experts, convolutional, other).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

#: The repository whose hf_prune this script sweeps (first on the path, in the workers too).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))

#: Task classes in the order a type's primary class is chosen (`derive.tiny_model_class` uses the same).
TASKS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "seq-cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "image-cls": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}
#: The prune amount each kind is checked with (one combined plan takes those of heads, neurons, experts, layers,
#: channels).
AMOUNTS = {
    "heads": {"attention_heads": 0.5},
    "kv_groups": {"kv_groups": 1},
    "neurons": {"mlp_neurons": 0.25},
    "experts": {"experts": 0.25},
    "attention_branches": {"attention_branches": 1},
    "mlp_branches": {"mlp_branches": 1},
    "layers": {"layers": 1},
    "channels": {"channels": 0.25},
    "stage_channels": {"stage_channels": 0.25},
}
COMBINED = ("heads", "neurons", "experts", "layers", "channels")
PRUNE = {"criterion": "magnitude", "reconstruct": "none"}
TOLERANCE = 1e-5
#: Reply lines of a worker start with this (libraries may print to stdout too).
MARK = "@@coverage@@ "
FAMILIES = ("attention + MLP", "attention + MoE", "convolutional", "other")  # and "unknown": not built


# --------------------------------------------------------------------------- enumeration
def model_types(tasks: tuple[str, ...] = tuple(TASKS)) -> dict[str, str]:
    """Model type → its primary task class, for every type registered in one of `tasks`' auto mappings."""
    from transformers.models.auto import modeling_auto

    found: dict[str, str] = {}
    for task, mapping in TASKS.items():
        for model_type in getattr(modeling_auto, mapping):
            found.setdefault(model_type, task)
    return {model_type: task for model_type, task in sorted(found.items()) if task in tasks}


def block_family(model) -> str:
    """What the model's blocks are, from its modules' class names: attention + MLP (attention modules, no
    state-space, recurrent or mixer modules), attention + MoE (experts beside attention), convolutional (2-d
    convolutions, no attention), else other (state-space, recurrent, hybrid mixers)."""
    from torch import nn

    names = [type(module).__name__ for module in model.modules()]
    attention = any(re.search(r"Attention|SelfAttn|Attn$", name) for name in names)
    mixer = r"Mamba|SSM|Ssm|Mixer|Rwkv|RWKV|Recurrent|LinearAttention|Conv1d|ShortConv|Hyena|Lstm|LSTM"
    if attention and not any(re.search(mixer, name) for name in names):
        return "attention + MoE" if any(re.search(r"Expert|Moe|MoE|Router", name) for name in names) else FAMILIES[0]
    if not attention and any(isinstance(module, nn.Conv2d) for module in model.modules()):
        return "convolutional"
    return "other"


def default_family(config_class) -> str:
    """`block_family` of the class's default-size model built on the meta device (shapes only), for a type
    whose tiny instance could not be built."""
    import torch

    from hf_prune.derivation.derive import tiny_model_class

    try:
        with torch.device("meta"):
            return block_family(tiny_model_class(config_class)(config_class()))
    except Exception:  # the defaults do not build either
        return "unknown"


# --------------------------------------------------------------------------- pruning (worker side)
def _reason(error: BaseException) -> str:
    from hf_prune.derivation.derive import first_line

    return f"{type(error).__name__}: {first_line(error)}"


def _grouped_query(model, adapter) -> bool:
    """Whether the first layer's attention shares each KV head between several query heads (≥ 2 KV heads)."""
    attention = adapter.geometry(adapter.layers(model)[0]).attention
    return attention is not None and attention.num_kv_heads > 1 and attention.heads_per_group > 1


def _save_case(folder: Path, kind: str, pruner, expected, inputs: dict, dense_config=None) -> str:
    """Save the pruned model and the reference logits (and inputs) for the reload worker; returns the format."""
    from safetensors.torch import save_file

    case = folder / kind
    pruner.save_pretrained(case / "model")
    save_file({"logits": expected.contiguous(), **inputs}, str(case / "expected.safetensors"))
    if dense_config is not None:  # a traced folder loads into a fresh unpruned instance of this config
        dense_config.architectures = [type(pruner.model).__name__]
        dense_config.to_json_file(case / "dense_config.json")
        return "traced"
    return pruner.report.output_format


def prune_type(model_type: str, folder: str) -> dict:
    """Build the tiny model, prune every kind its adapter verifies (and the combined plan), save each under
    `folder`. Returns the row without the reload results: `cases` maps kind → format of the saved folder."""
    import copy

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from hf_prune import HFPruner
    from hf_prune.derivation.derive import DerivedAdapter, build_tiny, model_output
    from hf_prune.derivation.verify import verified_derivation
    from hf_prune.errors import UnsupportedArchitectureError
    from hf_prune.masking import apply_masks

    row = {"family": "unknown", "adapter": "none", "cases": {}, "refused": {}, "failed": {}}
    config_class = CONFIG_MAPPING[model_type]
    try:
        model, inputs = build_tiny(config_class, seed=0)
    except Exception as error:  # typed refusal of the shrink rule (DerivedAdapterError), or the model's own
        row["refused"]["all"] = _reason(error)
        row["family"] = default_family(config_class)
        return row
    row["family"], row["model_class"] = block_family(model), type(model).__name__
    folder = Path(folder)
    try:
        adapter = HFPruner(copy.deepcopy(model)).adapter
    except UnsupportedArchitectureError as error:  # each kind's own reason, not the (shortened) summary
        adapter, row["refused"]["adapter"] = None, _reason(error)
        row["refused"] |= verified_derivation(config_class).refused
    if isinstance(adapter, DerivedAdapter):
        derivation = verified_derivation(config_class)
        row["adapter"], row["derive_seconds"] = "derived", round(derivation.seconds, 2)
        row["refused"] |= derivation.refused
    elif adapter is not None:
        row["adapter"] = "hand-written"
    if adapter is None:  # nothing derived: the traced path prunes generic channels
        row["adapter"] = "traced"
        try:
            pruner = HFPruner.from_model(copy.deepcopy(model), example_inputs=inputs)
            pruner.prune(channels=0.25, criterion="magnitude")
            expected = model_output(pruner.model, inputs)
            row["cases"]["channels"] = _save_case(folder, "channels", pruner, expected, inputs, model.config)
        except Exception as error:  # a refusal of the traced path is a finding, never a crash of the sweep
            row["failed"]["channels"] = _reason(error)
        return row
    kinds = [kind for kind in AMOUNTS if kind in adapter.kinds]
    if "kv_groups" in kinds and not _grouped_query(model, adapter):
        kinds.remove("kv_groups")  # multi-head attention: a KV group is one head (the `heads` kind)
        row["not_applicable"] = ["kv_groups"]
    plans = {kind: AMOUNTS[kind] for kind in kinds}
    combined = [kind for kind in COMBINED if kind in kinds]
    if len(combined) > 1:
        plans["combined"] = {key: value for kind in combined for key, value in AMOUNTS[kind].items()}
    for kind, amounts in plans.items():
        try:
            pruner = HFPruner(copy.deepcopy(model))
            pruner.prune(**amounts, **PRUNE)
            masked = copy.deepcopy(model)
            apply_masks(masked, pruner.adapter, pruner.plan)
            expected = model_output(masked, inputs)
            difference = (model_output(pruner.model, inputs) - expected).abs().max().item()
            if not difference <= TOLERANCE:
                row["failed"][kind] = f"cut and masked logits differ by {difference:.2e}"
                continue
            row["cases"][kind] = _save_case(folder, kind, pruner, expected, inputs)
        except Exception as error:  # recorded per kind; the other kinds go on
            row["failed"][kind] = _reason(error)
    return row


# --------------------------------------------------------------------------- reloading (worker side)
def _logits(model, inputs: dict):
    """Logits, else the last hidden state (as `derive.model_output`, which the plain reloader may not import)."""
    import torch

    with torch.no_grad():
        output = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def reload_cases(folder: str, cases: dict[str, str], role: str) -> dict:
    """Reload each case folder of one type in this fresh process and compare with the saved logits:
    `plain` loads vanilla folders with plain transformers (hf_prune never imported), `loader` the others
    with `hf_prune.load_pruned`. Returns kind → max |Δ logits| or the error."""
    import torch  # noqa: F401  (safetensors' torch loader)
    import transformers
    from safetensors.torch import load_file

    results = {}
    for kind, fmt in cases.items():
        case = Path(folder) / kind
        expected = load_file(str(case / "expected.safetensors"))
        inputs = {key: value for key, value in expected.items() if key != "logits"}
        try:
            if role == "plain":
                config = json.loads((case / "model" / "config.json").read_text())
                model_class = getattr(transformers, config["architectures"][0])
                model = model_class.from_pretrained(case / "model").eval()
                if "hf_prune" in sys.modules:
                    raise RuntimeError("a vanilla folder needed hf_prune")
            elif fmt == "traced":
                from hf_prune import load_pruned

                dense = transformers.AutoConfig.from_pretrained(case / "dense_config.json")
                model_class = getattr(transformers, dense.architectures[0])
                model = load_pruned(case / "model", model=model_class(dense)).eval()
            else:
                from hf_prune import load_pruned

                model = load_pruned(case / "model").eval()
            results[kind] = (_logits(model, inputs) - expected["logits"]).abs().max().item()
        except Exception as error:  # a folder that does not reload is the finding
            results[kind] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''}"
    return results


def serve(role: str) -> None:
    """Worker loop: one JSON request per stdin line, one `MARK`-prefixed JSON reply per request."""
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for line in sys.stdin:
        request = json.loads(line)
        if role == "prune":
            reply = prune_type(request["model_type"], request["folder"])
        else:
            reply = reload_cases(request["folder"], request["cases"], role)
        print(MARK + json.dumps(reply), flush=True)


class Worker:
    """One `coverage.py --serve ROLE` process, reused across requests; `ask` kills and replaces it when a
    request passes `limit` seconds or the process dies (the caller records the type as timed out)."""

    def __init__(self, role: str, log: Path):
        self.role, self.log, self.process = role, log, None

    def start(self) -> None:
        path = os.environ.get("PYTHONPATH", "")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", self.role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("a"),
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join([str(ROOT), path])},
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # only this worker, by its own handle
            self.process.wait()
            self.process = None

    def ask(self, request: dict, limit: float) -> dict | None:
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + limit
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(left):
                    break
                line = self.process.stdout.readline()
                if not line:  # the worker died (out of memory, a segfault): replaced on the next request
                    break
                if line.startswith(MARK):
                    return json.loads(line[len(MARK) :])
        self.stop()
        return None


# --------------------------------------------------------------------------- the sweep
def check_type(model_type: str, workers: dict[str, Worker], limit: float, scratch: Path) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        row = workers["prune"].ask({"model_type": model_type, "folder": folder}, limit)
        if row is None:
            return {"family": "unknown", "refused": {"all": f"timed out (> {limit:.0f} s) or the worker died"}}
        row["round_trip"] = {}
        for role, chosen in (
            ("plain", {k: f for k, f in row["cases"].items() if f == "vanilla"}),
            ("loader", {k: f for k, f in row["cases"].items() if f != "vanilla"}),
        ):
            if not chosen:
                continue
            reloaded = workers[role].ask({"folder": folder, "cases": chosen}, limit)
            for kind in chosen:
                value = (reloaded or {}).get(kind, "reload timed out or the worker died")
                if isinstance(value, float) and value <= TOLERANCE:
                    row["round_trip"][kind] = row["cases"][kind]
                else:
                    row["failed"][kind] = f"fresh reload: {value if isinstance(value, str) else f'Δ {value:.2e}'}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _kinds_text(row: dict) -> str:
    short = {"vanilla": "v", "traced": "t"}
    return " ".join(f"{kind}({short.get(fmt, 'l')})" for kind, fmt in row.get("round_trip", {}).items()) or "–"


def _refusals(row: dict) -> dict[str, str]:
    """Kind → why it does not round-trip (derivation refusals, then prune / reload failures)."""
    return {**row.get("refused", {}), **row.get("failed", {})}


def _has(row: dict, *kinds: str) -> bool:
    trips = row.get("round_trip", {})
    return all(kind in trips for kind in kinds)


def totals(rows: dict[str, dict], key: str, groups: tuple[str, ...]) -> str:
    lines = [
        f"| {key} | types | ≥ 1 kind | neurons + layers | + heads | experts | channels | combined |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in (*groups, "all"):
        chosen = [r for r in rows.values() if group == "all" or r.get(key) == group]
        if not chosen:
            continue
        n = len(chosen)

        def share(count: int, n: int = n) -> str:
            return f"{count} ({100 * count / n:.0f} %)"

        lines.append(
            f"| {group} | {n} | {share(sum(bool(r.get('round_trip')) for r in chosen))} "
            f"| {share(sum(_has(r, 'neurons', 'layers') for r in chosen))} "
            f"| {share(sum(_has(r, 'neurons', 'layers', 'heads') for r in chosen))} "
            f"| {share(sum(_has(r, 'experts') for r in chosen))} "
            f"| {share(sum(_has(r, 'channels') or _has(r, 'stage_channels') for r in chosen))} "
            f"| {share(sum(_has(r, 'combined') for r in chosen))} |"
        )
    return "\n".join(lines)


def common_reasons(rows: dict[str, dict], top: int = 12) -> list[tuple[int, str]]:
    """The most frequent refusal reasons (numbers and widths blanked so alike reasons count together)."""
    counts: dict[str, set[str]] = {}
    for model_type, row in rows.items():
        for reason in set(_refusals(row).values()):
            short = re.sub(r"\d+(?:\.\d+)?(?:e[-+]\d+)?", "N", reason.split(";")[0])[:110]
            counts.setdefault(short, set()).add(model_type)
    return sorted(((len(types), reason) for reason, types in counts.items()), reverse=True)[:top]


def table(rows: dict[str, dict], tasks: dict[str, str]) -> str:
    for model_type, row in rows.items():
        row["task"] = tasks.get(model_type, row.get("task"))
    seconds = sorted(r["derive_seconds"] for r in rows.values() if "derive_seconds" in r)
    parts = [
        "Round trip: prune → cut == masked (1e-5) → save → reload in a fresh process → logits equal (1e-5). "
        "Format: v vanilla (plain transformers), l loader (`hf_prune.load_pruned`), t traced channels.",
        "",
        totals(rows, "task", tuple(TASKS)),
        "",
        totals(rows, "family", (*FAMILIES, "unknown")),
        "",
    ]
    if seconds:
        parts.append(
            f"Derivation + verification per derived type: median {seconds[len(seconds) // 2]:.2f} s, "
            f"max {seconds[-1]:.2f} s ({len(seconds)} types)."
        )
    parts += ["", "Most common refusals (types):", ""]
    parts += [f"- {count}: {reason}" for count, reason in common_reasons(rows)]
    parts += ["", "| type | class | family | adapter | round trip | refused / failed (first reasons) | s |"]
    parts.append("|---|---|---|---|---|---|---|")
    for model_type, row in sorted(rows.items()):
        by_reason: dict[str, list[str]] = {}
        for kind, why in _refusals(row).items():
            if kind not in row.get("round_trip", {}):
                by_reason.setdefault(why, []).append(kind)
        refused = "; ".join(f"{', '.join(k)}: {why[:140]}" for why, k in list(by_reason.items())[:3])
        refused = refused.replace("|", "/").replace("\n", " ")
        parts.append(
            f"| {model_type} | {row.get('task', '')} | {row.get('family', '')} | {row.get('adapter', 'none')} "
            f"| {_kinds_text(row)} | {refused or '–'} | {row.get('seconds', '')} |"
        )
    return "\n".join(parts)


def settings(args) -> dict:
    from hf_prune.derivation.derive import MAX_TINY_PARAMETERS, TINY

    return {
        "tasks": args.tasks,
        "amounts": AMOUNTS,
        "prune": PRUNE,
        "tolerance": TOLERANCE,
        "time_limit": args.time_limit,
        "tiny": TINY,
        "max_tiny_parameters": MAX_TINY_PARAMETERS,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--output", default="outputs/coverage.json")
    parser.add_argument("--markdown", default="docs/coverage.md")
    parser.add_argument("--tasks", default=",".join(TASKS), help="task classes to sweep (comma separated)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per type and worker request")
    parser.add_argument("--serve", choices=("prune", "plain", "loader"), help=argparse.SUPPRESS)
    parser.add_argument("--derive-only", action="store_true", help="derivation and verification only")
    parser.add_argument("--json", help="with --derive-only: where to write the rows")
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    if args.derive_only:
        return derive_only(args)
    from results_file import open_results
    from tqdm import tqdm

    tasks = model_types(tuple(args.tasks.split(",")))
    chosen = args.model_types or list(tasks)
    results = open_results(args.output, settings(args), __file__, argv, parser)
    scratch = Path(tempfile.mkdtemp(prefix="coverage-"))
    log = Path(args.output).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    workers = {role: Worker(role, log) for role in ("prune", "plain", "loader")}
    try:
        for model_type in (bar := tqdm([t for t in chosen if t not in results], desc="coverage", unit="type")):
            bar.set_postfix_str(model_type)
            row = check_type(model_type, workers, args.time_limit, scratch)
            row["task"] = tasks.get(model_type, "")
            results.save_row(model_type, row)
            tqdm.write(f"{model_type:28s} {row.get('seconds', '-')!s:>6}s  {_kinds_text(row)}")
    finally:
        for worker in workers.values():
            worker.stop()
    text = results.report(table({t: results.rows[t] for t in chosen if t in results}, tasks))
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(f"# Coverage sweep\n\n```\n{results.header()}\n```\n\n{text.split(chr(10), 2)[2]}")


# --------------------------------------------------------------------------- derivation only
def _timeout(signum, frame):
    raise TimeoutError("derivation and verification took too long")


def derivation_sweep(model_types_: list[str], limit: int = 60) -> dict:
    """Derive and verify (hand-written adapters bypassed) each type in this process; one line per type."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from hf_prune.derivation.verify import verified_derivation

    rows = {}
    signal.signal(signal.SIGALRM, _timeout)
    for model_type in model_types_:
        start = time.perf_counter()
        signal.alarm(limit)
        try:
            derivation = verified_derivation(getattr(transformers, CONFIG_MAPPING_NAMES[model_type]))
            row = {"kinds": sorted(derivation.kinds), "formats": derivation.formats, "refused": derivation.refused}
        except Exception as error:  # a crash of the sweep itself is a finding too
            row = {"kinds": [], "formats": {}, "refused": {"all": f"{type(error).__name__}: {error}"[:300]}}
        signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows[model_type] = row
        print(f"{model_type:28s} {row['seconds']:6.2f}s  kinds={','.join(row['kinds']) or '-'}", flush=True)
        for kind, reason in sorted(row["refused"].items()):
            print(f"{'':30s}refused {kind}: {reason[:240]}", flush=True)
    return rows


def derive_only(args) -> None:
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    rows = derivation_sweep(args.model_types or list(model_types(("causal-lm",))))
    kinds = ("neurons", "layers", "heads", "kv_groups", "experts", "attention_branches", "mlp_branches")
    print(
        f"\n{len(rows)} types; verified: "
        + ", ".join(f"{k} {sum(k in r['kinds'] for r in rows.values())}" for k in kinds)
    )
    times = sorted(r["seconds"] for r in rows.values())
    print(f"seconds per type: median {times[len(times) // 2]:.2f}, max {times[-1]:.2f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
