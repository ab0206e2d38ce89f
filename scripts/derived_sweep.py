"""Derive and verify an adapter for every causal-LM model type of the installed transformers (issue 15).

    python scripts/derived_sweep.py [--json out.json] [model_type ...]

A thin mode of `scripts/coverage.py` (`--derive-only`): each type's config class goes through
`hf_prune.derivation.verify.verified_derivation` (hand-written adapters bypassed), in this process, and
one line per type prints the seconds, the verified kinds and each refused kind with its reason.
"""

import sys

from coverage import main

if __name__ == "__main__":
    main(["--derive-only", *sys.argv[1:]])
