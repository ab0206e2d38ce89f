"""Calibration: where the data comes from, and the statistics one pass over it collects."""
