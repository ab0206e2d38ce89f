"""Repairs: what changes the kept weights after a cut so the layer's output stays close to the dense one."""
