"""i-SpaSP selection (Wolfe & Kyrillidis 2021): choose the channels a consumer keeps, CoSaMP-style.

The target is the dense output `W x` of a consuming projection; a candidate keeps `s` channel
blocks (neurons, heads or KV groups) and refits them by least squares (docs/methods.md §4.1, §4.3). Each
iteration, from the current support `S` and its refit `V`:

1. the residual's gradient w.r.t. column `j`, `g_j = ((W − V) G)[:, j]`, proposes the blocks
   outside `S` with the largest gain `Σ_j ‖g_j‖² / G_jj` (the error one column alone could remove);
2. least squares on the union `T` of `S` and the proposals;
3. truncation back to `s` blocks, by greedy OBS removal from the refit on `T` (`criteria/obs.py`):
   the blocks whose removal costs least after re-solving go, rather than the smallest coefficients.

Everything is computed from the Gram matrix `G = E[x xᵀ]` of the consumer's input that the
calibration pass already holds: no activations are stored, and the error `tr((W − V) G (W − V)ᵀ)`
is exact on the calibration tokens. The best support seen (starting from the criterion's own
choice) is kept, so the result is never worse on calibration data than the criterion's choice
with the plain least-squares refit. The paper's optional gradient steps on the kept weights are
not needed here: on the Gram objective the least-squares solve already is their fixed point.
"""

from __future__ import annotations

import torch

from ..criteria.obs import greedy_removal_scores
from ..kinds import DAMPING

#: Rows of the Gram matrix and of the weight multiplied at a time in the refit (bounds its temporaries).
REFIT_BLOCK = 1024
#: CoSaMP rounds; each costs a few solves of the kept-channel size.
ITERATIONS = 4
#: Blocks proposed per round, as a fraction of the kept count (CoSaMP's `2s` makes the union the
#: whole layer once half of it is pruned, which turns the truncation into a one-shot choice).
PROPOSAL = 0.25


def least_squares_columns(
    weight: torch.Tensor,
    gram: torch.Tensor,
    kept: torch.Tensor,
    damping: float = DAMPING,
    count: int = 1,
    cross_term: torch.Tensor | None = None,
) -> torch.Tensor:
    """`W G[:, S] (G[S, S] + λI)⁻¹`: the kept columns that best reproduce `W x` (outputs × |S|);
    with `cross_term` `C = Σ d xᵀ` (a sum over the same tokens), the columns that best reproduce
    `W x + d`: `(W G[:, S] + C[:, S]) (G[S, S] + λI)⁻¹`.

    Computed in `gram`'s dtype (float64); `weight` may be float32 and is converted a block at a
    time. `gram` may be a sum over `count` tokens. At 8192 channels every full-size temporary costs
    hundreds of MB (the low-memory mode), so only the kept slices are copied, the right-hand side is
    built already transposed, and the two triangular solves of the Cholesky factor write in place."""
    gram_kept = gram[kept[:, None], kept]
    gram_kept /= count
    gram_kept.diagonal().add_(damping * gram_kept.diagonal().mean())
    factor = torch.linalg.cholesky(gram_kept)
    del gram_kept
    # `(W G[:, S])ᵀ = G[S, :] Wᵀ` (G is symmetric), a block of kept rows and of outputs at a time.
    solution = torch.empty(len(kept), weight.shape[0], dtype=gram.dtype, device=gram.device)
    for start in range(0, len(kept), REFIT_BLOCK):
        rows = kept[start : start + REFIT_BLOCK]
        for first in range(0, weight.shape[0], REFIT_BLOCK):
            outputs = weight[first : first + REFIT_BLOCK].to(gram.dtype)
            solution[start : start + len(rows), first : first + len(outputs)] = gram[rows] @ outputs.T
    if cross_term is not None:
        solution += cross_term[:, kept].T
    solution /= count
    torch.linalg.solve_triangular(factor, solution, upper=False, out=solution)
    torch.linalg.solve_triangular(factor.mT, solution, upper=True, out=solution)
    return solution.T


def output_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, columns: torch.Tensor) -> float:
    """`E‖W x − V_S x_S‖²` from the Gram matrix."""
    difference = weight.clone()
    difference[:, kept] -= columns
    return torch.einsum("ij,jk,ik->", difference, gram, difference).item()


def _channels(blocks: list[torch.Tensor], chosen: list[int]) -> torch.Tensor:
    return torch.cat([blocks[b] for b in chosen])


def select(
    weight: torch.Tensor,
    gram: torch.Tensor,
    blocks: list[torch.Tensor],
    initial: list[int],
    iterations: int = ITERATIONS,
    proposal: float = PROPOSAL,
    damping: float = DAMPING,
) -> list[int]:
    """The blocks to keep (as many as `initial`, sorted); `blocks` hold channel indices of `weight`'s columns."""
    keep = len(initial)
    support = sorted(initial)
    kept = _channels(blocks, support)
    best = support
    best_error = output_error(weight, gram, kept, least_squares_columns(weight, gram, kept, damping=damping))
    diagonal = gram.diagonal().clamp_min(damping * gram.diagonal().mean())
    for _ in range(iterations):
        inside = set(support)
        outside = [b for b in range(len(blocks)) if b not in inside]
        if not outside:
            break
        kept = _channels(blocks, support)
        residual = weight.clone()
        residual[:, kept] -= least_squares_columns(weight, gram, kept, damping=damping)
        gain = (residual @ gram).pow(2).sum(0) / diagonal
        block_gain = torch.stack([gain[blocks[b]].sum() for b in outside])
        count = min(len(outside), max(1, round(proposal * keep)))
        proposed = [outside[i] for i in torch.argsort(block_gain, descending=True, stable=True)[:count].tolist()]
        union = sorted(support + proposed)
        channels = _channels(blocks, union)
        positions = {int(c): i for i, c in enumerate(channels.tolist())}
        local = [torch.tensor([positions[int(c)] for c in blocks[b].tolist()]) for b in union]
        refit = least_squares_columns(weight, gram, channels, damping=damping)
        chunk = max(1, len(union) // 100)
        removal = greedy_removal_scores(refit, gram[channels][:, channels], local, chunk, damping=damping)
        survivors = sorted(union[i] for i in torch.argsort(removal, descending=True, stable=True)[:keep].tolist())
        if survivors == support:
            break
        support = survivors
        kept = _channels(blocks, support)
        error = output_error(weight, gram, kept, least_squares_columns(weight, gram, kept, damping=damping))
        if error < best_error:
            best, best_error = support, error
    return best
