"""Derive and verify an adapter for every causal-LM model type of the installed transformers (issue 15).

    python scripts/derived_sweep.py [--json out.json] [model_type ...]

For each model type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, its config class goes through
`hf_prune.derivation.verify.verified_derivation` (a tiny instance from the class's defaults, derivation,
a cut == masked check of every kind and a vanilla round trip), hand-written adapters bypassed.
Prints one line per type: seconds, verified kinds with their format, refused kinds with the reason.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
import warnings

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_prune.derivation.verify import verified_derivation

#: Seconds one type may take before the sweep records it as timed out and moves on.
TIME_LIMIT = 60


def _timeout(signum, frame):
    raise TimeoutError(f"derivation and verification took more than {TIME_LIMIT} s")


def sweep(model_types: list[str]) -> dict:
    rows = {}
    for model_type in model_types:
        start = time.perf_counter()
        signal.alarm(TIME_LIMIT)
        try:
            config_class = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
            derivation = verified_derivation(config_class)
            row = {
                "kinds": sorted(derivation.kinds),
                "formats": derivation.formats,
                "refused": derivation.refused,
            }
        except Exception as error:  # a crash of the sweep itself is a finding too
            row = {"kinds": [], "formats": {}, "refused": {"all": f"{type(error).__name__}: {error}"[:300]}}
        signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows[model_type] = row
        print(f"{model_type:28s} {row['seconds']:6.2f}s  kinds={','.join(row['kinds']) or '-'}", flush=True)
        for kind, reason in sorted(row["refused"].items()):
            print(f"{'':30s}refused {kind}: {reason[:240]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGALRM, _timeout)
    transformers.utils.logging.set_verbosity_error()
    rows = sweep(args.model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    kinds = ("neurons", "layers", "heads", "kv_groups", "attention_branches", "mlp_branches")
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
