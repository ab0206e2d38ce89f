"""The layer-by-layer drivers: one layer's scores, plan and repair at a time."""
