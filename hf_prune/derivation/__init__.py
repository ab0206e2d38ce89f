"""Adapters derived from the model itself, verified before use (issue 15): `derive.py` reads the names
from a tiny instance of the config class, `verify.py` checks every kind on it.

Outside `hf_prune.groups` on purpose: the loader format's remote code bundles every module of that
package, and derivation needs masking, surgery and checkpoint code that the bundle does not carry.
Importing it registers `derived_adapter` as `hf_prune.groups.get_adapter`'s fallback for configs without a
hand-written adapter (the hf_prune package imports it, so users never do).
"""

from ..groups.registry import register_fallback
from .derive import Derivation, DerivedAdapter
from .verify import derived_adapter, verified_derivation

register_fallback(derived_adapter)

__all__ = ["DerivedAdapter", "Derivation", "derived_adapter", "verified_derivation"]
