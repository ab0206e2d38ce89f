"""Quality and size measurements (kept in the package: `evaluate`'s perplexity reloads models by name)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def parameter_count(model: nn.Module) -> int:
    """Parameters, each tied tensor counted once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def perplexity(
    model: nn.Module, input_ids: torch.Tensor, seq_len: int = 512, max_windows: int | None = None, batch_size: int = 4
) -> float:
    """Perplexity over non-overlapping `seq_len`-token windows of a 1-D token stream.

    Every window is scored on its own (no context carried over), predicting tokens 2..seq_len;
    `max_windows` keeps the first windows only, as the WikiText-2 protocol of this project does.
    """
    windows = input_ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"need at least {seq_len} tokens for one window, got {input_ids.numel()}")
    device = next(model.parameters()).device
    batches = input_ids[: windows * seq_len].view(windows, seq_len).split(batch_size)
    total_nll = 0.0
    for batch in tqdm(batches, desc="perplexity", unit="batch", leave=False):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()
        total_nll += nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    return math.exp(total_nll / (windows * (seq_len - 1)))
