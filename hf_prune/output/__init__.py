"""Outputs: the pruned checkpoint, its formats, the model card, plot, recipe and the Hub push."""
