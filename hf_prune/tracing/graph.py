"""Channel dependencies of any `nn.Module`, read from one traced forward pass.

Why `torch.export`: it records the forward as a flat graph of ATen ops with the parameters as
named attributes, works on transformers 5 models (where `torch.fx.symbolic_trace` fails on their
Python control flow) and keeps views, reshapes, pads and concatenations as explicit ops. The
autograd graph would lose the parameter names of buffers (BatchNorm statistics) and every op that
does not need a gradient, such as the reshapes that split a width into heads.

How: every channel a linear or convolution layer produces gets an integer id. The exported graph
is run once on the example input together with a *label* tensor per activation, of the same shape,
whose elements hold the id of the channel they carry (`NONE` for none). Data-movement ops (view,
permute, cat, slice, pad ...) are applied to the labels as they are to the data, so reshapes into
heads, flattening and concatenation need no special case. Element-wise ops tie (union) the channels
that meet at one element (residual additions, gated MLPs); sums over an axis (matmul, attention)
tie every channel they mix; statistics over several channels (LayerNorm, softmax, mean over
channels) and every op this module does not know *block* the channels they touch: blocked
channels are reported and never pruned. What remains are groups of channels that can be cut
together: the producer rows, the per-channel normalisation entries and the consumer columns.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import TracingError
from ..groups import TensorSlice

#: Label of an element that carries no prunable channel.
NONE = -1.0
#: Producer name prefix of the blocked stand-in channels that fixed-size padding creates.
VIRTUAL_PREFIX = "<padding"
#: Label of an element of a parameter or constant: a channel meeting it element-wise is blocked.
CONSTANT = -2.0

_MOVEMENT = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "flatten",
    "unflatten", "clone", "contiguous", "alias", "detach", "movedim", "view_as", "expand_as", "repeat",
    "repeat_interleave", "lift_fresh_copy", "cat", "stack", "slice", "select", "narrow", "split", "split_with_sizes",
    "chunk", "unbind", "constant_pad_nd", "pad", "index", "index_select", "gather",
}  # fmt: skip
#: Movement ops that pick positions along an axis: they keep hard-coded sizes, so the axis must carry no channels.
_POSITIONAL = {"slice", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind", "index", "index_select",
               "gather", "repeat", "repeat_interleave"}  # fmt: skip
_KEEP_LABELS = {
    "to",
    "_to_copy",
    "type_as",
    "dropout_",
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "detach_",
}
_ELEMENTWISE = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "neg", "exp", "log", "sqrt", "rsqrt", "abs", "pow", "hardtanh",
    "clamp", "clamp_min", "clamp_max", "leaky_relu", "elu", "softplus", "mish", "hardswish", "hardsigmoid", "erf",
    "add", "sub", "rsub", "mul", "div", "where", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_not", "logical_and", "logical_or", "__and__", "__or__", "square", "reciprocal", "sin", "cos", "tanh_",
    "masked_fill", "lerp", "addcmul", "addcdiv", "fill", "gelu_", "silu_", "add_", "mul_", "sign", "floor", "round",
}  # fmt: skip
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "_assert_tensor_metadata", "sym_size",
               "scalar_tensor", "_assert_scalar", "sym_constrain_range_for_size"}  # fmt: skip
#: Tensors created with sizes written in the graph: constants, like parameters.
_CREATED = {
    "new_ones",
    "new_zeros",
    "new_empty",
    "new_full",
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
}
#: Reductions whose result sums its inputs: removing an input removes its share exactly.
_SUMS = {"sum", "amax", "amin", "max", "min", "cumsum"}
#: Reductions that normalise over their inputs: removing an input changes the others' result.
_STATISTICS = {"mean", "var", "std", "var_mean", "softmax", "_softmax", "log_softmax", "_log_softmax", "norm",
               "logsumexp", "avg_pool2d", "adaptive_avg_pool2d", "max_pool2d", "max_pool2d_with_indices",
               "avg_pool1d", "adaptive_avg_pool1d"}  # fmt: skip
_POOLS = {"avg_pool2d", "adaptive_avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "avg_pool1d",
          "adaptive_avg_pool1d"}  # fmt: skip
_BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "_batch_norm_with_update",
                "_native_batch_norm_legit"}  # fmt: skip
_LINEAR = {"linear"}
_CONVOLUTIONS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_MATMULS = {"matmul", "bmm", "mm"}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, count: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return start

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


@dataclass
class ChannelGraph:
    """The traced channels: who produces, normalises and consumes each one, and which are tied or blocked."""

    #: per channel id: the producing module's qualified name and output index
    producers: list[tuple[str, int]] = field(default_factory=list)
    #: per channel id: every tensor slice that holds it (producer rows, norm entries, consumer columns)
    slices: dict[int, list[TensorSlice]] = field(default_factory=lambda: defaultdict(list))
    #: per channel id: why it must stay (first reason found)
    blocked: dict[int, str] = field(default_factory=dict)
    ties: _UnionFind = field(default_factory=_UnionFind)

    def components(self) -> dict[int, list[int]]:
        """Channel ids grouped by what must go together, keyed by the smallest id of each group."""
        members: dict[int, list[int]] = defaultdict(list)
        for channel in range(len(self.producers)):
            members[self.ties.find(channel)].append(channel)
        return dict(members)


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _varies_along(labels: torch.Tensor, dim: int) -> bool:
    """Whether different channels (or a channel and no channel) sit at different positions along `dim`."""
    if labels.dim() == 0 or labels.shape[dim] <= 1 or not (labels >= 0).any():
        return False
    return bool((labels.amax(dim) != labels.amin(dim)).any())


def _channels(labels: torch.Tensor) -> torch.Tensor:
    return torch.unique(labels[labels >= 0]).long()


class _LabelInterpreter(fx.Interpreter):
    """Runs the exported graph on real values and, beside them, on channel labels."""

    def __init__(self, module: fx.GraphModule, tensor_names: set[str]):
        super().__init__(module)
        self.found = ChannelGraph()
        self.labels: dict[fx.Node, object] = {}
        self.tensor_names = tensor_names  # parameters and buffers of the user's model
        #: (fibres, reason): each row must hold one tied group of channels (or none) once all ties are known
        self.uniform: list[tuple[torch.Tensor, str]] = []

    # ------------------------------------------------------------------ bookkeeping
    def _labels(self, argument) -> torch.Tensor | None:
        return self.labels.get(argument) if isinstance(argument, fx.Node) else None

    def _block(self, labels: torch.Tensor | None, reason: str) -> None:
        if labels is None or not isinstance(labels, torch.Tensor):
            return
        for channel in _channels(labels).tolist():
            self.found.blocked.setdefault(channel, reason)

    def _block_all(self, node: fx.Node, reason: str) -> None:
        for argument in node.all_input_nodes:
            value = self.labels.get(argument)
            for labels in value if isinstance(value, (tuple, list)) else [value]:
                self._block(labels, reason)

    def _require_uniform(self, labels: torch.Tensor, dims: list[int], reason: str) -> None:
        """Ops with fixed sizes along `dims` (slices, pads, statistics, constants that do not broadcast)
        survive a prune only if every fibre along `dims` is one group of channels or none at all."""
        if not dims or not isinstance(labels, torch.Tensor) or not (labels >= 0).any():
            return
        dims = sorted(d % labels.dim() for d in dims)
        moved = labels.movedim(dims, list(range(labels.dim() - len(dims), labels.dim())))
        fibres = moved.reshape(-1, int(torch.tensor([labels.shape[d] for d in dims]).prod()))
        fibres = fibres.clamp(min=NONE)
        fibres = fibres[(fibres.amax(1) != fibres.amin(1)) & (fibres.amax(1) >= 0)]
        if len(fibres):
            self.uniform.append((torch.unique(fibres, dim=0), reason))

    def resolve(self) -> ChannelGraph:
        """Apply the deferred uniformity checks with the final ties; returns what was found."""
        roots = torch.tensor([self.found.ties.find(i) for i in range(len(self.found.producers))] + [-1])
        for fibres, reason in self.uniform:
            tied = roots[fibres.long()]  # NONE indexes the trailing -1
            mixed = tied.amax(1) != tied.amin(1)
            self._block(fibres[mixed], reason)
        return self.found

    def _tie_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        both = (a >= 0) & (b >= 0) & (a != b)
        if both.any():
            for x, y in torch.unique(torch.stack([a[both], b[both]]).long(), dim=1).T.tolist():
                self.found.ties.union(x, y)

    def _new_channels(self, module: str, count: int) -> torch.Tensor:
        start = self.found.ties.add(count)
        self.found.producers.extend((module, index) for index in range(count))
        return torch.arange(start, start + count, dtype=torch.float64)

    def _name(self, argument) -> str | None:
        """The qualified name of a parameter or buffer argument (None for a computed tensor)."""
        if isinstance(argument, fx.Node) and argument.op == "get_attr" and argument.target in self.tensor_names:
            return argument.target
        return None

    def _constant(self, value) -> object:
        """Labels for a parameter, buffer or created tensor: a scalar broadcasts anywhere, others are fixed."""
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            return torch.full(value.shape, CONSTANT, dtype=torch.float64)
        return self._fresh(value)

    def _fresh(self, value) -> object:
        """Labels for a value that carries no channel."""
        if isinstance(value, torch.Tensor):
            return torch.full(value.shape, NONE, dtype=torch.float64)
        if isinstance(value, (tuple, list)):
            return type(value)(self._fresh(v) for v in value)
        return None

    # ------------------------------------------------------------------ nodes
    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node.op == "placeholder":
            self.labels[node] = self._fresh(value)
        elif node.op == "get_attr":
            self.labels[node] = self._constant(value)
        elif node.op == "call_function":
            self.labels[node] = self._call(node, value)
        elif node.op == "output":
            self._block_all(node, "reaches the model's output")
        else:
            self._block_all(node, f"{node.op} {node.target} is not traced into")
            self.labels[node] = self._fresh(value)
        return value

    def _call(self, node: fx.Node, value):
        name = _op_name(node.target)
        where = f"{name} in {_module_of(node) or 'the top-level forward'}"
        if node.target is operator.getitem:
            source = self.labels.get(node.args[0])
            return source[node.args[1]] if isinstance(source, (tuple, list)) else self._fresh(value)
        first = self._labels(node.args[0]) if node.args else None
        if name in _SHAPE_ONLY:
            return self._fresh(value)
        if name in _CREATED:
            return self._constant(value)
        if name in _KEEP_LABELS and isinstance(first, torch.Tensor) and first.shape == getattr(value, "shape", None):
            return first
        if name in _MOVEMENT:
            return self._movement(node, name, value, where)
        if name in _ELEMENTWISE:
            return self._elementwise(node, value, where)
        if name in _LINEAR:
            return self._linear(node, value, where)
        if name in _CONVOLUTIONS:
            return self._convolution(node, value, where)
        if name in _BATCH_NORMS:
            return self._batch_norm(node, name, value, where)
        if name == "layer_norm":
            labels = self._labels(node.args[0])
            dims = list(range(labels.dim() - len(node.args[1]), labels.dim()))
            self._require_uniform(labels, dims, f"{where}: normalises over the channel axis")
            return labels
        if name == "group_norm":
            return self._group_norm(node, value, where)
        if name in _MATMULS:
            return self._matmul(first, self._labels(node.args[1]), value, where)
        if name == "scaled_dot_product_attention":
            return self._attention(node, value, where)
        if name in _SUMS or name in _STATISTICS:
            return self._reduction(node, name, value, where)
        self._block_all(node, f"{where}: the tracer does not know this op")
        return self._fresh(value)

    # ------------------------------------------------------------------ op families
    def _movement(self, node: fx.Node, name: str, value, where: str):
        args = list(node.args)
        data = self._labels(args[0]) if not isinstance(args[0], (list, tuple)) else [self._labels(a) for a in args[0]]
        if data is None or (isinstance(data, list) and any(d is None for d in data)):
            return self._fresh(value)
        if name in ("index", "repeat", "repeat_interleave", "gather"):
            self._block(data, f"{where}: indexes positions of a tensor that carries channels")
        elif name in _POSITIONAL:
            dim = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else node.kwargs.get("dim", 0)
            if name in ("split", "split_with_sizes", "chunk"):
                dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            self._require_uniform(
                data,
                [dim],
                f"{where}: picks fixed positions along an axis that carries channels",
            )
        if name in ("constant_pad_nd", "pad"):
            return self._pad(data, list(args[1]), where)
        args[0] = data
        real = {a: self.env[a] for a in args[1:] if isinstance(a, fx.Node)}
        args[1:] = [real.get(a, a) if isinstance(a, fx.Node) else a for a in args[1:]]
        if name == "index":  # list of index tensors
            args[1] = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args[1]]
        kwargs = {k: self.env[v] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
        return node.target(*args, **kwargs)

    def _pad(self, data: torch.Tensor, padding: list[int], where: str) -> torch.Tensor:
        """Zero padding is harmless along axes without channels. Along a channel axis its size is
        fixed in code: the input's channels are blocked, and the padded positions become blocked
        channels of their own, so whatever they are added to is blocked too."""
        reason = f"{where}: pads a channel axis by a fixed amount (it would not follow a prune)"
        result = torch.nn.functional.pad(data, padding, value=NONE)
        for position in range(0, len(padding), 2):
            before, after = padding[position], padding[position + 1]
            dim = data.dim() - 1 - position // 2
            if not (before or after) or not _varies_along(data, dim):
                continue
            self._block(data, reason)
            stop = result.shape[dim] - after
            for start, count in ((0, before), (stop, after)):
                ids = self._new_channels(f"{VIRTUAL_PREFIX}: {where}>", count)
                self._block(ids, reason)
                shape = [1] * result.dim()
                shape[dim] = count
                result.narrow(dim, start, count).copy_(ids.reshape(shape).expand_as(result.narrow(dim, start, count)))
        return result

    def _elementwise(self, node: fx.Node, value, where: str):
        if not isinstance(value, torch.Tensor):
            return None
        operands = [self._labels(a) for a in list(node.args) + list(node.kwargs.values())]
        operands = [o for o in operands if isinstance(o, torch.Tensor)]
        if not operands:
            return self._fresh(value)
        # a constant operand must be sliced with the channels along every axis it does not broadcast over
        rigid = {
            value.dim() - o.dim() + i
            for o in operands
            if (o == CONSTANT).any()
            for i, size in enumerate(o.shape)
            if size > 1
        }
        operands = [o.expand(value.shape) if o.shape != value.shape else o for o in operands]
        result = operands[0].clone()
        for other in operands[1:]:
            self._tie_pairs(result, other)
            result = torch.where(
                result >= 0,
                result,
                torch.where(other >= 0, other, torch.minimum(result, other)),
            )
        self._require_uniform(
            result,
            sorted(rigid),
            f"{where}: meets a parameter or constant that would need slicing",
        )
        return result

    def _consume(self, labels: torch.Tensor, dim: int, weight: str, weight_dim: int) -> None:
        """Register the columns of `weight` that read each channel found along `dim` of `labels`."""
        moved = labels.movedim(dim, 0).reshape(labels.shape[dim], -1)
        for column in range(moved.shape[0]):
            channels = _channels(moved[column]).tolist()
            for channel in channels:
                self.found.slices[channel].append(TensorSlice(weight, weight_dim, column, column + 1, consumer=True))
            for other in channels[1:]:
                self.found.ties.union(channels[0], other)

    def _produce(
        self,
        node: fx.Node,
        weight: str,
        bias: str | None,
        value: torch.Tensor,
        dim: int,
    ) -> torch.Tensor:
        channels = self._new_channels(weight.rpartition(".")[0], value.shape[dim])
        for index, channel in enumerate(channels.long().tolist()):
            self.found.slices[channel].append(TensorSlice(weight, 0, index, index + 1))
            if bias:
                self.found.slices[channel].append(TensorSlice(bias, 0, index, index + 1))
        shape = [1] * value.dim()
        shape[dim] = -1
        return channels.reshape(shape).expand(value.shape).clone()

    def _linear(self, node: fx.Node, value, where: str):
        inputs = self._labels(node.args[0])
        weight = self._name(node.args[1])
        bias = self._name(node.args[2]) if len(node.args) > 2 else None
        if weight is None:
            self._block(inputs, f"{where}: the weight is computed or tied to another parameter")
            return self._fresh(value)
        self._consume(inputs, inputs.dim() - 1, weight, 1)
        return self._produce(node, weight, bias, value, value.dim() - 1)

    def _convolution(self, node: fx.Node, value, where: str):
        inputs = self._labels(node.args[0])
        weight = self._name(node.args[1])
        bias = self._name(node.args[2]) if len(node.args) > 2 else None
        transposed = _op_name(node.target) in ("convolution", "_convolution") and node.args[6]
        groups = self.env[node.args[0]].shape[1] // self.env[node.args[1]].shape[1]
        if weight is None or transposed:
            self._block(inputs, f"{where}: transposed convolution or computed weight")
            return self._fresh(value)
        if groups == 1:
            self._consume(inputs, 1, weight, 1)
            return self._produce(node, weight, bias, value, 1)
        if groups == inputs.shape[1] == value.shape[1]:  # depthwise: channel c in, channel c out
            moved = inputs.movedim(1, 0).reshape(inputs.shape[1], -1)
            for channel_index in range(moved.shape[0]):
                channels = _channels(moved[channel_index]).tolist()
                for channel in channels:
                    self.found.slices[channel].append(TensorSlice(weight, 0, channel_index, channel_index + 1))
                    if bias:
                        self.found.slices[channel].append(TensorSlice(bias, 0, channel_index, channel_index + 1))
                if not channels:
                    return self._fresh(value)
            first = moved.amax(1)
            return first.reshape(1, -1, *[1] * (value.dim() - 2)).expand(value.shape).clone()
        self._block(inputs, f"{where}: grouped convolution (groups={groups})")
        return self._fresh(value)

    def _per_channel(self, labels: torch.Tensor, tensors: list[str | None]) -> None:
        """Attach entries `c` of per-channel tensors (norm weights, running statistics) to channel axis 1."""
        moved = labels.movedim(1, 0).reshape(labels.shape[1], -1)
        for index in range(moved.shape[0]):
            channels = _channels(moved[index]).tolist()
            for channel in channels:
                self.found.slices[channel] += [TensorSlice(t, 0, index, index + 1) for t in tensors if t]
            for other in channels[1:]:
                self.found.ties.union(channels[0], other)

    def _batch_norm(self, node: fx.Node, name: str, value, where: str):
        inputs = self._labels(node.args[0])
        tensors = [self._name(a) for a in node.args[1:5]]
        training = name == "batch_norm" and node.args[5]
        if training or name in (
            "native_batch_norm",
            "_batch_norm_with_update",
            "_native_batch_norm_legit",
        ):
            self._block(
                inputs,
                f"{where}: batch statistics in training mode (trace in eval mode)",
            )
            return self._fresh(value)
        self._per_channel(inputs, tensors)
        if isinstance(value, tuple):
            return (inputs, *(self._fresh(v) for v in value[1:]))
        return inputs

    def _group_norm(self, node: fx.Node, value, where: str):
        inputs = self._labels(node.args[0])
        if node.args[1] != inputs.shape[1]:
            self._block(
                inputs,
                f"{where}: normalises over several channels (num_groups={node.args[1]})",
            )
            return self._fresh(value)
        self._per_channel(inputs, [self._name(a) for a in node.args[2:4]])
        return inputs

    def _matmul(self, a: torch.Tensor, b: torch.Tensor, value, where: str):
        """`a @ b`: channels meeting at one contraction index are tied, and each output element ties
        every channel it sums over."""
        if a.dim() == 1 or b.dim() == 1 or not isinstance(value, torch.Tensor):
            self._block(a, f"{where}: vector product")
            self._block(b, f"{where}: vector product")
            return self._fresh(value)
        left = a.unsqueeze(-1)  # (..., I, K, 1)
        right = b.unsqueeze(-3)  # (..., 1, K, J)
        shape = torch.broadcast_shapes(left.shape, right.shape)
        left, right = left.expand(shape), right.expand(shape)
        for x, y in ((left, right), (right, left)):
            self._block(
                y[(x == CONSTANT) & (y >= 0)],
                f"{where}: multiplies channels by a parameter",
            )
        self._tie_pairs(left, right)
        merged = torch.where(left >= 0, left, right)
        return self._sum_fibres(merged.movedim(-2, -1), 1)

    def _sum_fibres(self, labels: torch.Tensor, count: int, tie: bool = True) -> torch.Tensor:
        """Reduce the last `count` axes, tying every channel of one fibre (a sum removes a channel's
        share exactly) unless `tie` is False (statistics, checked for uniformity instead)."""
        fibres = labels.reshape(*labels.shape[: labels.dim() - count], -1)
        top = fibres.amax(-1, keepdim=True)
        if tie:
            self._tie_pairs(top.expand(fibres.shape), fibres)
        else:  # a statistic of mixed channels carries none of them: it must not tie them downstream
            top = torch.where(fibres.amin(-1, keepdim=True) == top, top, torch.full_like(top, NONE))
        return top.squeeze(-1)

    def _attention(self, node: fx.Node, value, where: str):
        query, key, val = (self._labels(a) for a in node.args[:3])
        gqa = bool(node.kwargs.get("enable_gqa", False))
        if gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, val = (
                key.repeat_interleave(repeat, -3),
                val.repeat_interleave(repeat, -3),
            )
        left = query.unsqueeze(-2)  # (..., T, 1, D)
        right = key.unsqueeze(-3)  # (..., 1, S, D)
        shape = torch.broadcast_shapes(left.shape, right.shape)
        self._tie_pairs(left.expand(shape), right.expand(shape))
        scores = self._sum_fibres(
            torch.where(left.expand(shape) >= 0, left.expand(shape), right.expand(shape)),
            1,
        )
        # softmax over keys normalises within one head: its fibre must hold one group only
        self._require_uniform(scores, [scores.dim() - 1], f"{where}: softmax over several channel groups")
        return self._matmul(scores, val, value, where)

    def _reduction(self, node: fx.Node, name: str, value, where: str):
        labels = self._labels(node.args[0])
        if not isinstance(labels, torch.Tensor):
            return self._fresh(value)
        if name in _POOLS:  # per channel: a channel's positions must not mix with others'
            dims = list(range(2, labels.dim()))
            self._require_uniform(labels, dims, f"{where}: pools over several channels together")
            out = value[0] if isinstance(value, tuple) else value
            per_channel = labels.reshape(*labels.shape[:2], -1).amax(-1)
            result = per_channel.reshape(*per_channel.shape, *[1] * len(dims)).expand(out.shape).clone()
            return (result, *(self._fresh(v) for v in value[1:])) if isinstance(value, tuple) else result
        if name in (
            "softmax",
            "_softmax",
            "log_softmax",
            "_log_softmax",
            "cumsum",
            "logsumexp",
        ):
            dims = [node.args[1]]
        else:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = list(range(labels.dim())) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
        dims = [d % labels.dim() for d in dims] if labels.dim() else []
        if name in _STATISTICS:
            self._require_uniform(labels, dims, f"{where}: normalises over several channels together")
        moved = labels.movedim(dims, list(range(labels.dim() - len(dims), labels.dim())))
        reduced = self._sum_fibres(moved, len(dims), tie=name not in _STATISTICS)
        out = value[0] if isinstance(value, tuple) else value
        if out.shape == labels.shape:  # softmax, cumsum: same shape, every element carries its fibre's label
            shape = list(reduced.shape) + [1] * len(dims)
            result = (
                reduced.reshape(shape)
                .expand(moved.shape)
                .movedim(list(range(labels.dim() - len(dims), labels.dim())), dims)
            )
        else:
            result = reduced.reshape(out.shape) if reduced.numel() == out.numel() else self._fresh(out)
        if isinstance(value, tuple):
            return (result.clone(), *(self._fresh(v) for v in value[1:]))
        return result.clone()


def trace_channels(model: nn.Module, example_inputs: Mapping | tuple | torch.Tensor) -> ChannelGraph:
    """Export `model` on `example_inputs` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs) and label its channels; the model is left unchanged."""
    args, kwargs = split_inputs(example_inputs)
    if getattr(getattr(model, "config", None), "use_cache", None) is not None and not args:
        kwargs.setdefault("use_cache", False)  # a KV cache in the output cannot be exported
    try:
        with torch.no_grad():
            exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as error:  # export raises many types; all mean the same to the caller
        raise TracingError(
            f"torch.export could not trace {type(model).__name__} on the example inputs "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
            "pass example_inputs the model's forward accepts (a tensor, a tuple, or a dict of keyword inputs)."
        ) from error
    # get_attr nodes of the exported module name the user's parameters and buffers by their qualified
    # names; a tensor shared under several names (tied embeddings) is treated as computed: never sliced
    owners: dict[int, list[str]] = defaultdict(list)
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        owners[id(tensor)].append(name)
    names = {names[0] for names in owners.values() if len(names) == 1}
    interpreter = _LabelInterpreter(exported.module(), names)
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    with torch.no_grad():
        interpreter.run(*flat)
    return interpreter.resolve()


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    """A model input as (positional, keyword) arguments: a tensor, a tuple of tensors or a dict."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}
