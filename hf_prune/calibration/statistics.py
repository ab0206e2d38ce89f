"""One calibration pass → the statistics every data-aware criterion and repair reads.

Forward hooks accumulate, per layer, the input channels of each branch's consuming projection
(`o_proj`, `down_proj`, ...): counts, sums, sums of squares and, where asked, Gram matrices, each
batch computed in float32 and added into float64. Nothing is stored per token. Layer and branch
influence (`1 − cos(h_in, h_out)`) is accumulated the same way. Gradient criteria add one
backward pass per batch of the calibration loss (`calibration_loss`), summing gradients and squared
gradients of the layers' parameters.
On convolutional families that prune stage channels, `moments` also records the mean |value| of
every stage's output channel (`streams`), and `stream_gram` the Gram matrix of the stream channels
at every module that reads them (`stream_consumers`, for their least-squares repair). Without
gradients the task head is skipped (only the base model runs), unless `stream_gram` needs the
classifier's input. In mixture-of-experts layers `routing` records, per routed expert, how many tokens
the router sent to it, the sum of its gate weights and how often two experts are chosen together;
`expert_norms` also the sum of `g_j(x)·‖f_j(x)‖` over those tokens and the first-order error of removing
each expert (the experts module computes each (token, expert) pair once, unweighted, and the weighted sum
is formed after: `ExpertPairs`); `expert_removal` the exact error of removing each expert, the router run
again without it (`removal_errors`).
Under torchrun each process runs its share of the batches and the sums are
added across processes (`hf_prune.calibration.distributed`).

Method notes and sources: docs/methods.md §2.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidPruningTargetError
from ..finite import check_finite_statistics
from ..groups import ArchitectureAdapter, Branch
from ..groups.base import channels_last
from ..masking import run_kept_experts
from .distributed import local_share, sum_across_processes, sum_numbers
from .loss import calibration_loss

Requirement = Literal[
    "moments", "mlp_gram", "influence", "gradients", "stream_gram", "routing", "expert_norms", "expert_removal"
]
REQUIREMENTS: tuple[Requirement, ...] = (
    "moments",
    "mlp_gram",
    "influence",
    "gradients",
    "stream_gram",
    "routing",
    "expert_norms",
    "expert_removal",
)


#: A token's top-k weights count as renormalised (summing to 1) within this tolerance (16-bit routers round).
WEIGHT_SUM_TOLERANCE = 1e-2
#: Below this, `1 − g_j` counts as 0: the expert carried the whole token (top-1 routing).
WHOLE_TOKEN = 1e-6

#: Channel blocks of a Gram matrix: only the blocks on and above the diagonal are multiplied.
GRAM_BLOCKS = 4


def add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """`gram += xᵀx` from the upper-triangular blocks of xᵀx, mirrored: (b+1)/2b of the multiply-adds
    of one matmul (5/8 with 4 blocks; the MLP Gram costs about as much as the MLP's own forward).
    Each entry is the same float32 dot product as in `x.T @ x`, added into float64."""
    channels = x.shape[1]
    edges = [round(i * channels / GRAM_BLOCKS) for i in range(GRAM_BLOCKS + 1)]
    spans = [slice(start, stop) for start, stop in pairwise(edges) if stop > start]
    for i, rows in enumerate(spans):
        for columns in spans[i:]:
            block = (x[:, rows].T @ x[:, columns]).double()
            gram[rows, columns] += block
            if columns != rows:
                gram[columns, rows] += block.T


@dataclass
class ChannelStatistics:
    """Moments of the input channels of one consuming projection."""

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    with_gram: bool = False

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.total is None:
            channels = x.shape[1]
            self.total = torch.zeros(channels, dtype=torch.float64, device=x.device)
            self.squares = torch.zeros(channels, dtype=torch.float64, device=x.device)
            if self.with_gram:
                self.gram = torch.zeros(channels, channels, dtype=torch.float64, device=x.device)
        self.count += x.shape[0]
        # In-place adds of float32 blocks into float64 sums, the Gram a block of columns at a time:
        # at 8192 channels a whole float32 Gram is 256 MB and a float64 copy 512 MB more.
        self.total += x.sum(0)
        self.squares += x.pow(2).sum(0)
        if self.with_gram:
            add_gram(self.gram, x)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def mean_square(self) -> torch.Tensor:
        return self.squares / self.count

    @property
    def variance(self) -> torch.Tensor:
        return (self.mean_square - self.mean.pow(2)).clamp_min(0)


@dataclass
class RoutingStatistics:
    """What the router of one mixture-of-experts layer did over the calibration tokens, per routed expert."""

    #: tokens the router saw
    tokens: int = 0
    #: tokens routed to each expert (one of its top-k)
    selected: torch.Tensor | None = None
    #: Σ over tokens of each expert's gate weight (0 where not routed)
    gate: torch.Tensor | None = None
    #: tokens routed to both expert i and expert j (E × E; the diagonal is `selected`)
    co_selected: torch.Tensor | None = None
    #: Σ over the tokens routed to each expert of gate weight × ‖expert output‖ (`expert_norms` only)
    weighted_norm: torch.Tensor | None = None
    #: Σ over the tokens routed to each expert of its removal error to first order (`first_order_errors`;
    #: `expert_norms` only)
    first_order_error: torch.Tensor | None = None
    #: Σ over tokens of ‖y(x) − y₋ⱼ(x)‖², the router run again without expert j (`removal_errors`;
    #: `expert_removal` only)
    removal_error: torch.Tensor | None = None

    def add(
        self,
        indices: torch.Tensor,
        weights: torch.Tensor,
        count: int,
        norms: torch.Tensor | None,
        first_order: torch.Tensor | None = None,
        removal: torch.Tensor | None = None,
    ) -> None:
        """One batch: `indices` and `weights` (tokens × top-k), `norms` ‖f_j(x)‖ and `first_order` errors per
        (token, choice), `removal` the batch's removal error per expert."""
        if self.selected is None:
            zeros = functools.partial(torch.zeros, dtype=torch.float64, device=indices.device)
            self.selected, self.gate, self.co_selected = zeros(count), zeros(count), zeros(count, count)
            if norms is not None:
                self.weighted_norm, self.first_order_error = zeros(count), zeros(count)
            if removal is not None:
                self.removal_error = zeros(count)
        flat, gates = indices.reshape(-1), weights.reshape(-1).double()
        self.tokens += indices.shape[0]
        self.selected.index_add_(0, flat, torch.ones_like(gates))
        self.gate.index_add_(0, flat, gates)
        chosen = torch.zeros(indices.shape[0], count, device=indices.device).scatter_(1, indices, 1.0)
        self.co_selected += (chosen.T @ chosen).double()
        if norms is not None:
            self.weighted_norm.index_add_(0, flat, gates * norms.reshape(-1).double())
            self.first_order_error.index_add_(0, flat, first_order.reshape(-1).double())
        if removal is not None:
            self.removal_error += removal


def routing_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states, top-k indices, top-k weights) of a call `experts(hidden, top_k_index, top_k_weights)`."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    indices = next(t for t in tensors[1:] if not t.is_floating_point())
    weights = next(t for t in tensors[1:] if t.is_floating_point() and t.shape == indices.shape)
    return tensors[0], indices, weights


def routing_hook(accumulator: RoutingStatistics, count: int):
    """A forward hook on an experts module called as `experts(hidden, top_k_index, top_k_weights)` (the
    fused layout): accumulate its routing."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        _, indices, weights = routing_arguments(args, kwargs)
        accumulator.add(indices.detach(), weights.detach().float(), count, None)

    return hook


def first_order_errors(gram: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """`‖y(x) − y₋ⱼ(x)‖²` per (token, chosen expert j), without re-selection: `gram` the Gram matrix of each
    token's chosen outputs f(x) (tokens × k × k), `gates` g(x) (tokens × k), y(x) = Σ_k g_k f_k(x).

    Where the token's top-k weights sum to 1 (the family renormalises them), j's weight goes to the other k − 1
    in proportion: `y₋ⱼ = (y − g_j f_j)/(1 − g_j)`, so `y − y₋ⱼ = g_j/(1 − g_j)·(f_j − y)` and the error is
    `(g_j/(1 − g_j))²·‖f_j − y‖²`. Elsewhere (no renormalisation), and where j carried the whole token, the
    plain dropped contribution `‖g_j f_j‖²`. The norms come from the Gram matrix,
    `‖f_j − y‖² = G_jj − 2 (G g)_j + gᵀ G g`: nothing of width H is formed (on the reference MoE the
    subtraction itself cost 40 % of the experts' compute)."""
    gram, gates = gram.double(), gates.double()
    projections = (gram @ gates[..., None]).squeeze(-1)  # f_j · y
    squares = gram.diagonal(dim1=-2, dim2=-1)  # ‖f_j‖²
    to_mixed = (squares - 2 * projections + (gates * projections).sum(-1, keepdim=True)).clamp_min(0)
    rest = 1 - gates
    renormalised = ((gates.sum(-1, keepdim=True) - 1).abs() <= WEIGHT_SUM_TOLERANCE) & (rest > WHOLE_TOKEN)
    shifted = (gates / rest.clamp_min(WHOLE_TOKEN)).square() * to_mixed
    return torch.where(renormalised, shifted, gates.square() * squares)


def _top_k(output) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(indices, weights), tokens × top-k, of a router's output: its integer tensor and the floating one of the
    same shape (`(logits, weights, indices)` in every family of transformers 5); None if it has no such pair."""
    tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(t, torch.Tensor)]
    indices = next((t for t in tensors if not t.is_floating_point()), None)
    if indices is None:
        return None
    weights = next((t for t in tensors if t.is_floating_point() and t.shape == indices.shape), None)
    if weights is None:
        return None
    return indices.reshape(-1, indices.shape[-1]), weights.reshape(-1, indices.shape[-1])


class RouterRerun:
    """The layer's router, run again on some tokens as if one expert were gone (`masking.run_kept_experts`,
    what the masking reference does): the top-k the family's own router code then picks, in the original
    numbering. `parameters` are its tensors with one row per expert, named relative to it."""

    def __init__(self, module: nn.Module, parameters: list[str], name: str):
        self.module, self.parameters, self.name = module, parameters, name
        self.checked = False

    def top_k(self, hidden: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        found = _top_k(run_kept_experts(self.module, kept, self.parameters, (hidden,), {}))
        return kept[found[0]], found[1].float()

    def check(self, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Refuse (typed error) a router whose call on the experts' input does not give the experts' top-k."""
        found = _top_k(self.module(hidden))
        if found is None or not torch.equal(found[0], indices) or not torch.allclose(found[1].float(), weights):
            raise InvalidPruningTargetError(
                f"the removal error of an expert (`expert_removal` statistics, criterion 'output_error') runs the "
                f"router {self.name} again without the expert, and expects its call on the experts' input to return "
                "the top-k indices and weights the experts receive; this family's router does not. Use criterion "
                "{'experts': 'gate_weight'} or 'reap' for this model."
            )
        self.checked = True


def removal_errors(
    router: RouterRerun,
    compute_pairs,
    flat: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    outputs: torch.Tensor,
    gram: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """Σ over the batch's tokens of `‖y(x) − y₋ⱼ(x)‖²` per expert j (float64, `count` entries), with `y₋ⱼ` what
    the layer computes once j is removed: the router re-run without j's row (its own top-k and renormalisation
    over the other experts), each chosen expert's output weighted by its new gate.

    `flat` the tokens (tokens × H), `indices` and `gates` the forward's top-k (tokens × k), `outputs` its pairs
    f(x) (tokens × k × H) and `gram` their Gram matrix per token (tokens × k × k); `compute_pairs(tokens,
    indices, ones)` the experts' own forward, run once on the (token, expert) pairs the forward did not compute
    (the expert that moves into the top-k: one more pair per token routed by softmax, top-k and
    renormalisation). When every token's top-k weights sum to 1 (the router renormalises them), only the tokens
    routed to j are re-run: removing an expert a token did not choose leaves its top-k and renormalised weights
    as they are under a softmax (or sigmoid) top-k; other routers re-run every token (E router calls per
    batch). Each token's difference is a combination `Σ_i c_i f_i` of its chosen and newly chosen experts'
    outputs, so `‖y − y₋ⱼ‖² = cᵀ G c` with `G` their Gram matrix, extended by the experts that move in:
    nothing of width H is formed per removed expert."""
    tokens_count, top_k = indices.shape
    errors = torch.zeros(count, dtype=torch.float64, device=flat.device)
    if count <= top_k:  # no expert can go
        return errors
    renormalised = bool(((gates.sum(-1) - 1).abs() <= WEIGHT_SUM_TOLERANCE).all())
    everyone = torch.arange(tokens_count, device=flat.device)
    requests, missing = [], []
    for expert in range(count):
        tokens = (indices == expert).any(-1).nonzero().squeeze(1) if renormalised else everyone
        if tokens.numel() == 0:
            continue
        kept = torch.tensor([e for e in range(count) if e != expert], device=flat.device)
        chosen, weights = router.top_k(flat[tokens], kept)
        match = chosen[:, :, None] == indices[tokens][:, None, :]  # (tokens, new choice, old choice)
        found = match.any(-1)
        keys = tokens[:, None] * count + chosen
        missing.append(keys[~found])
        requests.append((expert, tokens, weights, found, match.int().argmax(-1), keys))
    if not requests:
        return errors
    # Per token: its k chosen outputs, then the outputs of the experts that move in once one of them goes.
    new_keys = torch.unique(torch.cat(missing))  # sorted: by token, then expert
    gram, slots = gram.double(), None
    if new_keys.numel():
        owners = new_keys // count
        slots = torch.arange(new_keys.numel(), device=flat.device) - torch.searchsorted(new_keys, owners * count)
        ones = torch.ones(new_keys.numel(), 1, dtype=gates.dtype, device=flat.device)
        extra = _first(compute_pairs(flat[owners], (new_keys % count)[:, None], ones)).detach().float()
        moved_in = outputs.new_zeros(tokens_count, int(slots.max()) + 1, outputs.shape[-1])
        moved_in[owners, slots] = extra
        cross = (outputs @ moved_in.transpose(1, 2)).double()
        inner = (moved_in @ moved_in.transpose(1, 2)).double()
        gram = torch.cat([torch.cat([gram, cross], 2), torch.cat([cross.transpose(1, 2), inner], 2)], 1)
    for expert, tokens, weights, found, position, keys in requests:
        coefficients = torch.zeros(tokens.numel(), gram.shape[-1], dtype=torch.float64, device=flat.device)
        coefficients[:, :top_k] = gates[tokens].double()  # y
        if not found.all():
            position[~found] = top_k + slots[torch.searchsorted(new_keys, keys[~found])]
        coefficients.scatter_add_(1, position, -weights.double())  # − y₋ⱼ
        errors[expert] += torch.einsum("ni,nij,nj->", coefficients, gram[tokens], coefficients)
    return errors


def list_routing_hooks(accumulator: RoutingStatistics, router: nn.Module, entries: nn.ModuleList) -> list:
    """Routing of a per-expert module list, whose block applies the gate weights itself: the tokens the router
    reads, and the tokens each entry is called on (`selected`; `gate` and `weighted_norm` stay unmeasured)."""
    count = len(entries)

    def tokens(module: nn.Module, args: tuple) -> None:
        hidden = args[0]
        accumulator.tokens += hidden.reshape(-1, hidden.shape[-1]).shape[0]

    def selected(entry: int):
        def hook(module: nn.Module, args: tuple) -> None:
            hidden = args[0]
            if accumulator.selected is None:
                accumulator.selected = torch.zeros(count, dtype=torch.float64, device=hidden.device)
            accumulator.selected[entry] += hidden.reshape(-1, hidden.shape[-1]).shape[0]

        return hook

    handles = [router.register_forward_pre_hook(tokens)]
    handles += [entry.register_forward_pre_hook(selected(index)) for index, entry in enumerate(entries)]
    return handles


class ExpertPairs:
    """While installed, the experts module computes each (token, chosen expert) pair once, with weight 1, by
    its own forward (`f_j(x)`), records the routing, `g_j(x)·‖f_j(x)‖` and the first-order removal error
    (`first_order_errors`), and returns `Σ_k g_k f_k(x)`, what its forward returns: the expert outputs REAP
    reads at no extra expert compute (the pairs are the ones the forward computes anyway; only the order of
    the top-k sum differs). With a `router` (`expert_removal`) it also records the exact removal error of every
    expert (`removal_errors`). `remove()` restores the forward."""

    def __init__(self, module: nn.Module, accumulator: RoutingStatistics, count: int, router: RouterRerun | None):
        self.module, self.accumulator, self.count = module, accumulator, count
        original = module.forward

        def forward(*args, **kwargs):
            hidden, indices, weights = routing_arguments(args, kwargs)
            top_k = indices.shape[-1]
            flat = hidden.reshape(-1, hidden.shape[-1])
            pairs = original(
                flat.repeat_interleave(top_k, dim=0), indices.reshape(-1, 1), torch.ones_like(weights).reshape(-1, 1)
            )
            pairs = _first(pairs)
            outputs = pairs.detach().float().reshape(-1, top_k, pairs.shape[-1])
            chosen, gates = indices.detach().reshape(-1, top_k), weights.detach().float().reshape(-1, top_k)
            gram = outputs @ outputs.transpose(1, 2)  # tokens × k × k
            removal = None
            if router is not None:
                if not router.checked:
                    router.check(flat, chosen, gates)
                removal = removal_errors(router, original, flat, chosen, gates, outputs, gram, count)
            first_order = first_order_errors(gram, gates)
            norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # ‖f_j(x)‖ from the Gram's diagonal
            accumulator.add(chosen, gates, count, norms, first_order, removal)
            # Σ_k g_k f_k(x) as one batched product (tokens × 1 × k @ tokens × k × H): a product and a sum over k
            # cost a third of this pass's overhead on the reference MoE
            mixed = torch.bmm(weights.reshape(-1, 1, top_k).to(pairs.dtype), pairs.reshape(-1, top_k, pairs.shape[-1]))
            return mixed.to(hidden.dtype).reshape(hidden.shape)

        module.forward = forward

    def remove(self) -> None:
        del self.module.forward  # back to the class's forward


@dataclass
class CalibrationStatistics:
    """Everything one calibration pass measured, keyed by (original) layer index."""

    consumers: dict[tuple[int, Branch], ChannelStatistics] = field(default_factory=dict)
    #: stage → moments of |stage output| per stream channel (`mean` is the mean magnitude).
    streams: dict[int, ChannelStatistics] = field(default_factory=dict)
    #: qualified module name → moments and Gram of the stream channels it reads (`stream_gram`).
    stream_consumers: dict[str, ChannelStatistics] = field(default_factory=dict)
    #: mean of 1 − cos(stream before, stream after) per token, for "layer", "attention", "mlp".
    influence: dict[tuple[int, str], float] = field(default_factory=dict)
    #: Σ over batches of the gradient, and of its square, per (layer, parameter name in the layer).
    gradient_sum: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    gradient_squares: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: layer → what its router did (mixture-of-experts layers; `routing`, `expert_norms`)
    routing: dict[int, RoutingStatistics] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0
    #: what was collected, so a reuse can check it has what its criteria need.
    requirements: frozenset[str] = frozenset()


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _one_minus_cos(before: torch.Tensor, after: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return 1 - nn.functional.cosine_similarity(before.float(), after.float(), dim=dim)


class InfluenceRecorder:
    """Hooks that measure how much each layer and branch turns the residual stream."""

    def __init__(self, stats: CalibrationStatistics):
        self.stats = stats
        self.sums: dict[tuple[int, str], float] = {}
        self.counts: dict[tuple[int, str], int] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.stream: dict[int, torch.Tensor] = {}

    def _add(self, key: tuple[int, str], values: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + values.sum().item()
        self.counts[key] = self.counts.get(key, 0) + values.numel()

    def register(self, index: int, layer: nn.Module, adapter: ArchitectureAdapter) -> list:
        def layer_input(module, args, kwargs):
            self.inputs[index] = self.stream[index] = args[0] if args else kwargs["hidden_states"]

        def layer_output(module, args, kwargs, output):
            before, after = self.inputs.pop(index), _first(output)
            self._add((index, "layer"), _one_minus_cos(before, after, adapter.stream_channel_dim))
            self.stream.pop(index)

        def branch_output(branch: str):
            def hook(module, args, output):
                before = self.stream[index]
                after = before + _first(output)
                self._add((index, branch), _one_minus_cos(before, after))
                self.stream[index] = after  # the MLP of a sequential block reads stream + attention

            return hook

        handles = [
            layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            layer.register_forward_hook(layer_output, with_kwargs=True),
        ]
        experts = adapter.experts_of(layer)
        for branch, name in (
            ("attention", adapter.o_proj),
            ("mlp", experts.moe_module if experts else adapter.down_proj),
        ):
            # Branch outputs add to the stream only in families that prune branches.
            if f"{branch}_branches" in adapter.kinds and adapter.has_branch(layer, branch):
                handles.append(layer.get_submodule(name).register_forward_hook(branch_output(branch)))
        return handles

    def finish(self) -> None:
        keys = sorted(self.sums)
        totals = sum_numbers([self.sums[key] for key in keys] + [self.counts[key] for key in keys])
        for key, total, count in zip(keys, totals, totals[len(keys) :]):
            self.stats.influence[key] = total / count


def sum_statistics(stats: CalibrationStatistics) -> None:
    """Add every process's moments, Grams, gradients and counts (nothing with one process)."""
    accumulators = [stats.consumers[key] for key in sorted(stats.consumers)]
    accumulators += [stats.streams[stage] for stage in sorted(stats.streams)]
    accumulators += [stats.stream_consumers[name] for name in sorted(stats.stream_consumers)]
    gradient_keys = sorted(stats.gradient_sum)
    routers = [stats.routing[key] for key in sorted(stats.routing)]
    sum_across_processes(
        [t for acc in accumulators for t in (acc.total, acc.squares, acc.gram) if t is not None]
        + [stats.gradient_sum[key] for key in gradient_keys]
        + [stats.gradient_squares[key] for key in gradient_keys]
        + [
            t
            for r in routers
            for t in (r.selected, r.gate, r.co_selected, r.weighted_norm, r.first_order_error, r.removal_error)
            if t is not None
        ]
    )
    counts = sum_numbers(
        [stats.batches, stats.tokens] + [acc.count for acc in accumulators] + [r.tokens for r in routers]
    )
    stats.batches, stats.tokens = int(counts[0]), int(counts[1])
    for acc, count in zip(accumulators, counts[2 : 2 + len(accumulators)]):
        acc.count = int(count)
    for router, count in zip(routers, counts[2 + len(accumulators) :]):
        router.tokens = int(count)


def register_layer_hooks(
    stats: CalibrationStatistics,
    index: int,
    layer: nn.Module,
    adapter: ArchitectureAdapter,
    recorder: InfluenceRecorder | None,
) -> list:
    """Hooks that accumulate one layer's forward-pass statistics into `stats` (as
    `stats.requirements` asks): the whole-model pass and the low-memory layer loop share them."""
    handles = []
    if stats.requirements & {"moments", "mlp_gram"}:
        for branch, name in (("attention", adapter.o_proj), ("mlp", adapter.down_proj)):
            if name is None or not adapter.has_branch(layer, branch) or branch == "mlp" and adapter.experts_of(layer):
                continue  # routed experts have no one consuming projection
            # Attention Grams are small (heads × head_dim squared) and serve head criteria and repair.
            accumulator = ChannelStatistics(with_gram=branch == "attention" or "mlp_gram" in stats.requirements)
            stats.consumers[(index, branch)] = accumulator
            module = layer.get_submodule(name)
            handles.append(
                module.register_forward_pre_hook(lambda m, args, acc=accumulator: acc.add(channels_last(m, args[0])))
            )
    experts = adapter.experts_of(layer)
    if experts and stats.requirements & {"routing", "expert_norms", "expert_removal"}:
        accumulator = stats.routing[index] = RoutingStatistics()
        module, count = layer.get_submodule(experts.experts_module), experts.num_experts(layer)
        if experts.per_expert:
            handles += list_routing_hooks(accumulator, layer.get_submodule(experts.router), module)
        elif stats.requirements & {"expert_norms", "expert_removal"}:
            router = None
            if "expert_removal" in stats.requirements:
                rows = experts.router_parameters + experts.router_buffers
                names = [name.removeprefix(experts.router + ".") for name in rows]
                router = RouterRerun(layer.get_submodule(experts.router), names, experts.router)
            handles.append(ExpertPairs(module, accumulator, count, router))
        else:
            handles.append(module.register_forward_hook(routing_hook(accumulator, count), with_kwargs=True))
    if recorder:
        handles += recorder.register(index, layer, adapter)
    return handles


def register_stream_hooks(stats: CalibrationStatistics, model: nn.Module, adapter: ArchitectureAdapter) -> list:
    """Hooks that accumulate |output| per channel of every stage (`moments`, for stream channel
    criteria) and the input Gram of every module reading a stream (`stream_gram`, for their repair)."""
    handles = []
    for stage, module in enumerate(adapter.stages(model)):
        if "moments" in stats.requirements:
            accumulator = stats.streams[stage] = ChannelStatistics()
            handles.append(
                module.register_forward_hook(
                    lambda m, args, output, acc=accumulator: acc.add(output.abs().movedim(1, -1))
                )
            )
        if "stream_gram" in stats.requirements:
            for name in adapter.stream_members(model, stage).consumers:
                accumulator = stats.stream_consumers[name] = ChannelStatistics(with_gram=True)
                consumer = model.get_submodule(name)
                handles.append(
                    consumer.register_forward_pre_hook(
                        lambda m, args, acc=accumulator: acc.add(channels_last(m, args[0]))
                    )
                )
    return handles


def base_model(model: nn.Module) -> nn.Module:
    """The model without its task head (the LM head alone costs ~25% of a small LM's forward)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def batch_tokens(batches: Iterable[torch.Tensor]) -> int:
    """How many tokens calibration batches hold: every token id counts, an image (pixel batch) counts once."""
    return sum(batch.shape[0] if batch.is_floating_point() else batch.numel() for batch in batches)


def model_inputs(batch: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    batch = batch.to(device)
    return {"pixel_values": batch} if batch.is_floating_point() else {"input_ids": batch}


def collect_statistics(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    batches: Iterable[torch.Tensor],
    requirements: set[Requirement],
) -> CalibrationStatistics:
    """Run the calibration batches once and return what `requirements` ask for (checked finite:
    `hf_prune.finite`; the model is left as it was)."""
    stats = CalibrationStatistics(requirements=frozenset(requirements))
    layers = adapter.layers(model)
    recorder = InfluenceRecorder(stats) if "influence" in requirements else None
    handles = []
    for index, layer in enumerate(layers):
        handles += register_layer_hooks(stats, index, layer, adapter, recorder)
    if requirements & {"moments", "stream_gram"} and "stage_channels" in adapter.kinds:
        handles += register_stream_hooks(stats, model, adapter)

    gradients = "gradients" in requirements
    # The classifier reads the last stage's stream: its repair needs the task head to run.
    streams = "stream_gram" in requirements and "stage_channels" in adapter.kinds
    forward = model if streams else base_model(model)
    layer_parameters = {id(p) for p in layers.parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in layer_parameters]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for parameter in frozen:  # embeddings and heads: no gradient needed, saves a large matmul
            parameter.requires_grad_(False)
        for batch in tqdm(local_share(list(batches)), desc="calibration", unit="batch", leave=False):
            inputs = model_inputs(batch, device)
            stats.batches += 1
            stats.tokens += batch_tokens([batch])
            if not gradients:
                with torch.no_grad():
                    forward(**inputs)
                continue
            loss = calibration_loss(model, inputs)
            loss.backward()
            for index, layer in enumerate(layers):
                for name, parameter in layer.named_parameters():
                    if parameter.grad is None:
                        continue
                    grad = parameter.grad.detach().double()
                    key = (index, name)
                    if key in stats.gradient_sum:
                        stats.gradient_sum[key] += grad
                        stats.gradient_squares[key] += grad.pow(2)
                    else:
                        stats.gradient_sum[key], stats.gradient_squares[key] = grad, grad.pow(2)
            model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
        for parameter in frozen:
            parameter.requires_grad_(True)
        model.train(was_training)
    sum_statistics(stats)
    if recorder:
        recorder.finish()
    check_finite_statistics(stats, adapter, model)
    return stats
