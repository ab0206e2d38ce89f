"""Adapters derived from the model itself, verified before use (issue 15): `derive.py` reads the names
from a tiny instance of the config class, `verify.py` checks every kind on it.

Outside `hf_prune.groups` on purpose: the loader format's remote code bundles every module of that
package, and derivation needs masking, surgery and checkpoint code that the bundle does not carry.
`hf_prune.groups.get_adapter` imports it by name when no hand-written adapter exists.
"""

from .derive import Derivation, DerivedAdapter, derived_adapter, verified_derivation

__all__ = ["DerivedAdapter", "Derivation", "derived_adapter", "verified_derivation"]
