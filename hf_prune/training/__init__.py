"""Pruning during training: the Trainer callback, its schedule, masks, scores, gates and recovery."""
