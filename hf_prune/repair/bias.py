"""Bias compensation (FLAP; An et al. 2024): give back the mean of what the removed channels wrote.

Removing input channels `R` of a consumer `W` loses `W_R x_R`; its mean part `c = W_R E[x_R]` is
a constant, so it is added to the consumer's bias. Many consumers have no bias (Llama's
`o_proj` and `down_proj`, Qwen2's `o_proj`), and adding one would change the family's parameter
set: the checkpoint would no longer load with a plain config (Qwen2 has no flag for an `o_proj`
bias; Llama's `attention_bias` would add q/k/v biases too). There, the constant is folded into
the kept columns instead: the least-squares fit `Δ = argmin E‖c − Δ x_S‖² = c · E[x_S]ᵀ E[x_S x_Sᵀ]⁻¹`
is added to `W_S`, so `Δ x_S` reproduces `c` as well as the kept channels can, and the pruned
model keeps the dense model's parameter names and output format.

Method notes and sources: docs/methods.md §4.2.
"""

from __future__ import annotations

import torch

from ..kinds import DAMPING


def removed_mean_contribution(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """`W_R E[x_R]`: the constant the removed channels added to the output, on average."""
    return weight[:, removed] @ mean[removed]


def fold_constant_into_columns(
    constant: torch.Tensor, mean: torch.Tensor, second_moment: torch.Tensor, damping: float = DAMPING
) -> torch.Tensor:
    """The column update `Δ = c aᵀ` with `a = (M + λI)⁻¹ E[x]`, `M = E[x xᵀ]` over the kept channels:
    the best linear stand-in for a bias a bias-free consumer cannot hold."""
    regularised = second_moment + damping * second_moment.diagonal().mean() * torch.eye(
        len(mean), dtype=second_moment.dtype
    )
    return torch.outer(constant, torch.linalg.solve(regularised, mean))
