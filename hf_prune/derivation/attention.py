"""Each block's attention, read from the projections' widths and confirmed by the dataflow (`probes.reach`).

With `H` the hidden size, `n`, `m` the query and KV head counts and `d` the head size: query = `H → n·d`, key and
value = `H → m·d`, output = `n·d → H`; a fused q/k/v projection `H → (n + 2m)·d` is read chunk by chunk
(`fused_layout`). A value channel reaches only its own column in every query head that reads it, a query or key
channel only the columns of its heads. Names are hints for the order only (q before k), never the evidence.
"""

from __future__ import annotations

import copy
import functools
import re

import torch
from torch import nn

from ..errors import DerivedAdapterError
from ..groups.base import in_features, out_features
from ..kinds import ATTENTION_KINDS
from .fields import ALIASES, config_field, config_value, field_value, role_field, stage_field, with_entry
from .probes import first_line, modules_run, output_of, parameter_reach, reach, reach_many
from .record import Derivation

#: Name hints, only to order projections whose shapes and dataflow are alike (never as evidence).
_HINTS = {
    "q": {"q", "query", "wq", "queries"},
    "k": {"k", "key", "wk", "keys"},
    "v": {"v", "value", "wv", "values"},
    "gate": {"gate", "w1", "wi_0"},
}


def _tokens(name: str) -> set[str]:
    last = name.rpartition(".")[2]
    return {last, *re.split(r"[_\d]+", last)} - {""}


def hinted(names: list[str], hint: str) -> list[str]:
    """`names` with those the hint names first (stable otherwise: registration order)."""
    return sorted(names, key=lambda name: 0 if _tokens(name) & _HINTS[hint] else 1)


def common_parent(names: list[str]) -> str:
    """The longest common dotted prefix of `names` (their closest common module)."""
    parts = [name.split(".")[:-1] for name in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def derive_attention(found: Derivation, model, inputs, block, projections, hidden: int) -> None:
    """The block's attention: read from all its projections, else from those of one submodule at a time (in
    registration order), so that a decoder block's self-attention is found beside its cross-attention."""
    config = found.config_of(model.config)
    found.heads_field = role_field(config, "num_attention_heads", found.layers_field) or stage_field(
        config, "num_attention_heads", found.layers_field
    )
    found.kv_heads_field = role_field(config, "num_key_value_heads", found.layers_field) or stage_field(
        config, "num_key_value_heads", found.layers_field
    )
    if found.heads_field and not found.kv_heads_field:  # the canonical KV field: MHA where it is the heads' own
        shared = config_field(type(config), "num_key_value_heads") == config_field(type(config), "num_attention_heads")
        found.kv_heads_field = found.heads_field if shared else None
    heads = (
        field_value(config, found.heads_field) if found.heads_field else config_value(config, "num_attention_heads")
    )
    if not isinstance(heads, int):
        found.refuse(ATTENTION_KINDS, f"no head-count field ({ALIASES['num_attention_heads']})")
        return
    kv_heads = field_value(config, found.kv_heads_field) if found.kv_heads_field else None
    kv_heads = kv_heads or config_value(config, "num_key_value_heads") or heads
    head_dims = [d for d in (config_value(config, "head_dim"), hidden // heads) if isinstance(d, int) and d > 0]
    scopes = [""] + [
        name for name, _ in block.named_modules() if name and sum(p.startswith(name + ".") for p in projections) >= 2
    ]
    first, seen = None, {}
    probe = functools.partial(_cached_reach, seen, model, inputs, block)  # scopes share their probes
    for scope in scopes:
        inside = {n: shape for n, shape in projections.items() if n.startswith(scope + ".") or not scope}
        why = _attention_in(found, probe, model, inputs, block, inside, hidden, heads, kv_heads, head_dims)
        if why is None:
            return
        first = first or why
    for scope in scopes if not first else ():  # no q/k/v layout fits the widths: heads read from the dataflow
        inside = {n: shape for n, shape in projections.items() if n.startswith(scope + ".") or not scope}
        why = headed_attention(found, model, inputs, block, inside, hidden, heads)
        if why is None:
            return
        first = first or why
    found.refuse(
        ATTENTION_KINDS,
        first
        or _silent_attention(probe, projections, hidden, heads, head_dims)
        or f"no projections of widths {hidden}→{heads}×d and {heads}×d→{hidden} (d in {head_dims}) in "
        f"{type(block).__name__}; found {projections}",
    )


def _silent_attention(probe, projections: dict, hidden: int, heads: int, head_dims: list[int]) -> str:
    """Why projections of the q/k/v and output widths were not matched where none of them reaches another on the
    tiny inputs (MRA's block-sparse attention returns zeros without its CUDA kernel): the heads cannot be
    confirmed from the dataflow. "" otherwise."""
    for d in dict.fromkeys(head_dims):
        feeders = [n for n, (i, o) in projections.items() if i == hidden and o == heads * d]
        outputs = [n for n, (i, o) in projections.items() if i == heads * d and o == hidden]
        if len(feeders) < 3 or not outputs or any(probe(p, 1, o) for p in feeders for o in outputs if p != o):
            continue
        names = ", ".join(dict.fromkeys(feeders + outputs))
        return (
            f"the projections {names} ({hidden}→{heads}×{d}, {heads}×{d}→{hidden}) reach none of one another on the "
            "tiny inputs (an attention whose output does not depend on them here: a kernel that does not run on this "
            "device returns zeros, as MRA's without CUDA), so its heads cannot be confirmed and stay whole"
        )
    return ""


def _cached_reach(seen: dict, model, inputs, block, producer: str, channel: int, consumer: str) -> set[int]:
    key = (producer, channel, consumer)
    if key not in seen:
        seen[key] = reach(model, inputs, block, producer, channel, consumer)
    return seen[key]


def _attention_in(found, probe, model, inputs, block, projections, hidden, heads, kv_heads, head_dims) -> str | None:
    """Derive the attention from `projections` (None: found); "" where no layout fits their widths, else why
    the dataflow refutes the one that fits."""
    for d in dict.fromkeys(head_dims):
        q_width, kv_width = heads * d, kv_heads * d
        outputs = [n for n, (i, o) in projections.items() if i == hidden and o == q_width]
        kv_outputs = [n for n, (i, o) in projections.items() if i == hidden and o == kv_width and kv_width != q_width]
        # the output projection: the H-wide consumer of n·d columns whose input the other projections reach
        candidates = [n for n, (i, o) in projections.items() if i == q_width and o == hidden]
        # fused q/k/v: H → (n + 2m)·d, with m the config's KV heads, or one (multi-query)
        fused = {n: (o - q_width) // (2 * d) for n, (i, o) in projections.items() if i == hidden and o > q_width}
        fused = {n: m for n, m in fused.items() if projections[n][1] == q_width + 2 * m * d and m in (kv_heads, 1)}
        feeders = list(dict.fromkeys(outputs + kv_outputs + list(fused)))
        consumers = [c for c in candidates if any(probe(p, 1, c) for p in feeders if p != c)]
        outputs = [n for n in outputs if n not in consumers]
        if len(consumers) == 1 and len(fused) == 1 and not outputs:
            (qkv, m), o = next(iter(fused.items())), consumers[0]
            wider = functools.partial(_wider_roles, found, model, inputs, block, qkv, o, hidden)
            layout = fused_layout(model, inputs, block, qkv, o, heads, m, d, wider)
            if not is_layout(layout):
                return f"fused q/k/v projection {qkv} ({hidden}→{(heads + 2 * m) * d}): {layout}"
            found.qkv_proj, found.qkv_layout, found.o_proj = qkv, layout, o
            found.width_attributes = WIDTH_ATTRIBUTES + FUSED_WIDTH_ATTRIBUTES
            _attention_module(found, model, inputs, block, [qkv, o])
            _head_dim_attribute(found, block, d)
            _head_parameters(found, block, heads, [qkv, o])
            _head_width_parameters(found, model, inputs, block, heads, d, [qkv, o])
            return None
        if len(consumers) != 1:
            continue
        o, extras = consumers[0], []
        if kv_width != q_width and len(outputs) > 1 and len(kv_outputs) == 2:  # a query and per-head gates
            q, extras = _query_and_gates(probe, outputs, o, d)
            outputs = [q] if q else outputs
        if kv_width != q_width and len(outputs) == 1 and len(kv_outputs) == 2:
            q, pair = outputs[0], kv_outputs
        elif kv_width == q_width and len(outputs) == 3:
            q, pair = hinted(outputs, "q")[0], [n for n in outputs if n != hinted(outputs, "q")[0]]
        else:
            continue
        why, key, value = _query_key_value(probe, q, pair, o, heads, kv_heads, d)
        if why:
            return why
        found.q_proj, found.k_proj, found.v_proj, found.o_proj = q, key, value, o
        found.query_gates = tuple(extras)
        _attention_module(found, model, inputs, block, [q, key, value, o, *extras])
        _head_dim_attribute(found, block, d)
        _head_parameters(found, block, heads, [q, key, value, o, *extras])
        _head_width_parameters(found, model, inputs, block, heads, d, [q, key, value, o, *extras])
        return None
    return ""


def headed_attention(found: Derivation, model, inputs, block, projections: dict, hidden: int, n: int) -> str | None:
    """Attention without a q/k/v layout (multi-head latent attention: DeepSeek-V2/V3's `q_b_proj` rows
    `n·(d_nope + d_rope)`, `kv_b_proj` rows `n·(d_nope + d_v)`, `o_proj` columns `n·d_v`), read from the dataflow
    alone (None: found; else why not, "" where nothing fits):

    the output projection `o` (`n·d_o → H`) and every projection `P` (`→ n·w`) whose channels in chunk 1 (rows
    `w … 2w-1`: the first and last probed) reach only the columns of head 1 in `o` (`d_o … 2d_o-1`). At least two
    such producers, one of whose channels reaches several columns of its head (the query or key: attention mixes
    a head's positions and its value columns; an MLP's neuron reaches its one column only). A head is then its
    chunk of rows in every producer and its columns of `o`; projections that reach every head (the shared
    latent `q_a_proj`, `kv_a_proj_with_mqa`) stay whole. One that reaches nothing on the tiny inputs (an
    attention used only with other inputs: Longformer's global projections) leaves the head layout unconfirmed:
    refused."""
    ran = modules_run(model, inputs, block, list(projections))
    for name in projections:  # beside projections that run, one that does not: its heads cannot be probed
        parent = name.rpartition(".")[0]
        if name not in ran and any(p in ran and p.rpartition(".")[0] == parent for p in projections):
            idle = [p for p in projections if p not in ran and p.rpartition(".")[0] == parent]
            return (
                f"{', '.join(idle)} do not run on the tiny inputs, beside the other projections of {parent} (an "
                "attention used with other inputs only): the heads they hold cannot be confirmed"
            )
    first = ""
    outputs = [o for o, (width, out) in projections.items() if out == hidden and width % n == 0]
    base: dict = {}  # the consumers' inputs without noise, shared by every probe
    reached = functools.cache(lambda name, channel: reach_many(model, inputs, block, name, channel, outputs, base))
    for o in outputs:
        d = projections[o][0] // n
        columns, producers, mixes, silent = set(range(d, 2 * d)), [], False, []
        for name, (_, rows) in projections.items():
            if name == o or rows % n or rows < n:
                continue
            w = rows // n
            seen = [reached(name, w + 1 if w > 1 else w)[o]]
            if seen[0] and seen[0] <= columns and w > 2:  # the chunk's last channel too, where its first fits
                seen.append(reached(name, 2 * w - 1)[o])
            if not any(seen):
                silent.append(name)
            elif all(r and r <= columns for r in seen):
                producers.append(name)
                mixes = mixes or any(len(r) > 1 for r in seen)
        if len(producers) < 2 or not mixes:
            continue
        parent = common_parent([*producers, o])
        silent = [name for name in silent if parent and name.startswith(parent + ".")]
        silent = [n_ for n_ in silent if not _consulted_apart(model, inputs, block, n_, producers, projections, n)]
        if silent:
            first = first or (
                f"{', '.join(silent)} in {parent} reach nothing of {o} on the tiny inputs (an attention used with "
                "other inputs only): the heads they hold cannot be confirmed"
            )
            continue
        found.o_proj, found.head_producers = o, tuple(producers)
        _attention_module(found, model, inputs, block, [*producers, o])
        if found.attention_module and not _head_count_attribute(found, block, n):
            found.refuse(
                ATTENTION_KINDS - {"attention_branches"},
                f"no integer attribute of {found.attention_module} holds the head count {n} "
                f"({ALIASES['num_attention_heads']})",
            )
        _head_parameters(found, block, n, [*producers, o])
        return None
    return first


def _consulted_apart(model, inputs, block, name: str, producers: list[str], projections: dict, n: int) -> bool:
    """Whether `name`, a projection under the attention that reaches nothing of its output on the tiny inputs,
    belongs to a computation the attention consults apart from its heads, which stays whole: it lives in a child
    module no head producer lives in (DeepSeek-V3.2's `indexer`, which picks the tokens to attend to from the
    hidden states and the shared query latent) and no head producer's channel reaches its input (a head's
    channel 1 of each producer: it reads no head). A sibling of the producers (Longformer's global q/k/v, idle
    on inputs without global tokens) is not: the heads it holds cannot be confirmed."""
    module = name.rpartition(".")[0]
    if any(producer.startswith(module + ".") or producer.rpartition(".")[0] == module for producer in producers):
        return False
    for producer in producers:
        width = projections[producer][1] // n
        if reach_many(model, inputs, block, producer, width + 1 if width > 1 else width, [name])[name]:
            return False
    return True


def _head_count_attribute(found: Derivation, block: nn.Module, n: int) -> bool:
    """The module under the attention module and its integer attribute holding the head count `n`."""
    prefix = f"{found.attention_module}."
    for name, module in block.get_submodule(found.attention_module).named_modules():
        for attribute in ALIASES["num_attention_heads"]:
            value = getattr(module, attribute, None)
            if type(value) is int and value == n:
                found.heads_module = (prefix + name).rstrip(".")
                found.head_count_attribute = attribute
                return True
    return False


def _query_and_gates(probe, outputs: list[str], o: str, d: int) -> tuple[str | None, list[str]]:
    """Of several `H → n·d` projections beside the KV pair, the query and the per-head output gates (Beam's
    `gate_proj`: `attention · σ(gate)`), from the dataflow: channel `d + 1` (head 1) of the query reaches every
    column of head 1 in `o` (through its scores), of a gate only its own column. (None, []) where that is not
    what the dataflow shows."""
    head = set(range(d, 2 * d))
    reached = {name: probe(name, d + 1, o) for name in outputs}
    queries = [name for name, r in reached.items() if len(r) > 1 and r <= head]
    gates = [name for name, r in reached.items() if r == {d + 1}]
    if len(queries) != 1 or len(gates) != len(outputs) - 1:
        return None, []
    return queries[0], gates


def _query_key_value(probe, q: str, pair: list[str], o: str, n: int, m: int, d: int) -> tuple[str, str, str]:
    """Which of `pair` is the key and which the value, from the dataflow into `o` (why not, else ""):

    a value channel reaches only its own column of each query head reading it, a key channel the columns of
    those heads, a query channel its own head's columns. A per-head norm of the values (over `d`: Gemma-4's
    `v_norm`) makes a value channel reach its heads' columns too: then both are alike, told apart by the
    names (k before v), which no cut depends on (a KV head's key and value rows are removed together).
    A channel that reaches columns of heads it does not feed (a norm over the whole `n·d` width, a sub-norm
    before `o`, a mixing of heads) couples the heads: refused, since no head can be cut alone."""
    group = n // m
    channel = d + 1 if m > 1 else 1  # channel 1 of KV head 1 (or 0)
    kv_head = channel // d
    own_columns = {h * d + channel % d for h in range(kv_head * group, (kv_head + 1) * group)}
    head_columns = set(range(kv_head * group * d, (kv_head + 1) * group * d))
    reached = {name: probe(name, channel, o) for name in pair}
    query_channel = (channel // d) * d + 1
    query_reach = probe(q, query_channel, o)
    coupled = [
        (name, c, sorted(r - columns))
        for name, c, r, columns in (
            *((name, channel, reached[name], head_columns) for name in pair),
            (q, query_channel, query_reach, set(range(query_channel // d * d, (query_channel // d + 1) * d))),
        )
        if r - columns
    ]
    if coupled:
        name, c, outside = coupled[0]
        return (
            f"{name}, channel {c}, reaches {len(outside)} columns of {o} outside the heads it feeds ({outside[:8]}…): "
            "the heads are coupled (a norm or mixing over the whole width, not per head), so none can be cut alone",
            "",
            "",
        )
    values = [name for name in pair if reached[name] == own_columns]
    keys = [name for name in pair if reached[name] and name not in values]
    if not values and len(keys) == 2:  # a per-head norm of the values: alike, ordered by the names
        keys, values = hinted(pair, "k")[:1], hinted(pair, "k")[1:]
    if len(values) != 1 or len(keys) != 1 or not query_reach:
        return (
            f"{q}, {pair[0]}, {pair[1]} → {o}: the dataflow does not show a query, a key and a value "
            f"(channel {channel} reaches {[sorted(reached[n]) for n in pair]})",
            "",
            "",
        )
    return "", keys[0], values[0]


#: Attention attributes holding the head size.
HEAD_DIM_ATTRIBUTES = ("head_dim", "head_size", "attention_head_size", "d_head", "key_value_proj_dim")
#: Attention attributes holding the query width `n·d` that fused forwards split by.
WIDTH_ATTRIBUTES = ("split_size", "all_head_size")
#: With a fused q/k/v projection, also this one (GPT-BigCode splits the query off by `embed_dim`).
FUSED_WIDTH_ATTRIBUTES = ("embed_dim",)
#: Fused q/k/v row layouts, as the chunk (of `d` rows) holding each query head `h` and KV head `j`'s key and
#: value, for `n` query heads, `m` KV heads and `G = n / m` query heads per KV head:
#: "blocked" [q_0 … q_n-1 | k_0 … k_m-1 | v_0 … v_m-1] (GPT-2, MPT, GPT-BigCode), "grouped" per KV head
#: [q_jG … q_jG+G-1 k_j v_j] (GPT-NeoX and BLOOM with G = 1, Falcon's GQA layout). Any other order or
#: interleaving of groups is read from the dataflow too (`fused_layout`) and written `group_layout` does.
FUSED_LAYOUTS = ("blocked", "grouped")
#: The parts of a fused projection's group, in every order (q before k first: with `G = 1` they look alike).
PART_ORDERS = ("qkv", "qvk", "vqk", "kqv", "kvq", "vkq")


def group_layout(groups: str, order: str) -> str:
    """A fused layout of groups, each holding its query heads, then its KV heads' keys and values, as blocks in
    `order` (a permutation of "qkv"): `groups` "4" a fixed count of groups (CodeGen's `mp_num = 4`: [q v k]
    per group), "m/2" one group per 2 KV heads; "blocked" is "1" with "qkv", "grouped" is "m/1" with "qkv"."""
    return f"{groups}:{order}"


def fused_chunks(layout: str, n: int, m: int) -> tuple[list[int], list[int], list[int]]:
    """The chunk index of every query head, KV head key and KV head value in the fused projection."""
    if layout == "blocked":
        return list(range(n)), [n + j for j in range(m)], [n + m + j for j in range(m)]
    groups, _, order = ("m/1:qkv" if layout == "grouped" else layout).partition(":")
    g = m // int(groups[2:]) if groups.startswith("m/") else int(groups)
    if g < 1 or n % g or m % g or set(order) != set("qkv") or len(order) != 3:
        raise DerivedAdapterError(
            f"fused q/k/v layout {layout!r}: {n} query heads and {m} KV heads do not split into its {g} groups; "
            "prune heads so that every group keeps the same number (or keep the attention whole)"
        )
    sizes = {"q": n // g, "k": m // g, "v": m // g}
    width = sum(sizes.values())
    offset = {part: sum(sizes[p] for p in order[: order.index(part)]) for part in "qkv"}
    chunks = {
        part: [(i // sizes[part]) * width + offset[part] + i % sizes[part] for i in range(n if part == "q" else m)]
        for part in "qkv"
    }
    return chunks["q"], chunks["k"], chunks["v"]


def is_layout(layout: str) -> bool:
    """Whether `layout` is a fused layout (else the sentence `fused_layout` says what the chunks are)."""
    return layout in FUSED_LAYOUTS or re.fullmatch(r"(\d+|m/\d+):[qkv]{3}", layout) is not None


def _wider_roles(found: Derivation, model, inputs, block, qkv: str, o: str, hidden: int, n: int, m: int):
    """(chunk roles, query heads, KV heads) of `qkv` in a second instance of the model with twice the heads (the
    head-count fields doubled, and the KV one with them where it has as many; where the class or its forward
    refuses the halved head size, the hidden size doubled too), else why there is none."""
    name = next(name for name, module in model.named_modules() if module is block)
    why = ""
    for widen in (False, True):
        config = copy.deepcopy(model.config)
        owner = found.config_of(config)
        heads = found.heads_field or config_field(type(owner), "num_attention_heads")
        kv = found.kv_heads_field if found.kv_heads_field != heads else None
        m2 = 2 * m if m == n or kv else m
        try:
            setattr(owner, *with_entry(owner, heads, 2 * n))
            if kv:
                setattr(owner, *with_entry(owner, kv, m2))
            if widen:
                setattr(owner, config_field(type(owner), "hidden_size"), 2 * hidden)
            torch.manual_seed(0)
            wider = type(model)(config).eval()
            wider_block = wider.get_submodule(name)
            rows = out_features(wider_block.get_submodule(qkv))
            d2 = rows // (2 * n + 2 * m2)
            if rows % (2 * n + 2 * m2) or in_features(wider_block.get_submodule(o)) != 2 * n * d2:
                why = why or f"with {2 * n} heads, {qkv} has {rows} rows"
                continue
            roles = chunk_roles(wider, inputs, wider_block, qkv, o, 2 * n, m2, d2)
        except Exception as error:  # the class refuses the doubled head count, or its forward does
            why = why or f"no instance with {2 * n} heads: {first_line(error)}"
            continue
        return (roles, 2 * n, m2) if not isinstance(roles, str) else f"with {2 * n} heads, {roles}"
    return why


def chunk_roles(model, inputs, block, qkv: str, o: str, n: int, m: int, d: int) -> list[tuple[str, int]] | str:
    """The role of every chunk of `d` rows of `qkv`, read from the dataflow into `o` (else a sentence saying what
    a chunk reaches):

    noise in channel 1 of a chunk reaches, in `o`'s input columns: a value chunk of KV head `j` only column 1 of
    each of its query heads (("v", j)); a query chunk of head `h` only head `h`'s columns (("q", h)); a key chunk
    of KV head `j` the columns of all its query heads (("k", j)). With one query head per KV head, query and key
    both reach their head's columns only: ("qk", h)."""
    group = n // m
    seen: list[tuple[str, int]] = []
    for chunk in range(n + 2 * m):
        reached = reach(model, inputs, block, qkv, chunk * d + 1, o)
        touched = sorted({c // d for c in reached})
        if touched and reached == {h * d + 1 for h in touched} and len(touched) == group:
            seen.append(("v", touched[0] // group))
        elif len(touched) == 1 and group > 1:
            seen.append(("q", touched[0]))
        elif (
            len(touched) == group
            and touched[0] % group == 0
            and touched == list(range(touched[0], touched[0] + group))
        ):
            seen.append(("qk" if group == 1 else "k", touched[0] // group))
        else:
            return f"chunk {chunk} (rows {chunk * d}…{chunk * d + d - 1}) reaches columns {sorted(reached)} of {o}"
    return seen


def _expected_roles(layout: str, n: int, m: int) -> list[tuple[str, int] | None]:
    group, expected = n // m, [None] * (n + 2 * m)
    queries, keys, values = fused_chunks(layout, n, m)
    for h, chunk in enumerate(queries):
        expected[chunk] = ("qk" if group == 1 else "q", h)
    for j, (key, value) in enumerate(zip(keys, values)):
        expected[key], expected[value] = ("qk" if group == 1 else "k", j), ("v", j)
    return expected


def layouts_of(seen: list[tuple[str, int]], n: int, m: int) -> list[tuple[int, str]]:
    """Every (group count, part order) whose layout gives the chunk roles `seen`, fewest groups first; with one
    query head per KV head, q before k (they look alike: a head's query and key go together)."""
    return [
        (g, order)
        for g in range(1, m + 1)
        if m % g == 0
        for order in PART_ORDERS
        if _expected_roles(group_layout(str(g), order), n, m) == seen
    ]


def fused_layout(model, inputs, block, qkv: str, o: str, n: int, m: int, d: int, wider=None) -> str:
    """The layout the dataflow shows (`chunk_roles`): "blocked", "grouped", else `group_layout`'s, else a
    sentence saying what the chunks are.

    One group, or one per KV head in "qkv" order, are the named layouts, as before. `g` groups in another order
    (1 < g) hold either a fixed count of groups or one per `m / g` KV heads, alike on one instance: `wider(n, m)`
    gives the chunk roles, head counts and head size of a second instance with twice the heads, whose group
    count tells them apart (None: refused, saying so)."""
    seen = chunk_roles(model, inputs, block, qkv, o, n, m, d)
    if isinstance(seen, str):
        return seen
    found = layouts_of(seen, n, m)
    if not found:
        return f"the chunks of {d} rows are {seen}, no layout of groups of [q, k, v] parts in any order"
    g, order = found[0]
    if g == 1 and order == "qkv":
        return "blocked"
    if g == m and order == "qkv":
        return "grouped"
    if g == 1:
        return group_layout("1", order)
    second = wider(n, m) if wider else "no second instance"
    if isinstance(second, str):
        return f"{g} groups of [{', '.join(order)}] chunks: a fixed count or one per {m // g} KV heads? ({second})"
    roles, n2, m2 = second
    g2 = next((count for count, part_order in layouts_of(roles, n2, m2) if part_order == order), None)
    if g2 == g:
        return group_layout(str(g), order)
    if g2 is not None and m2 // g2 == m // g:
        return group_layout(f"m/{m // g}", order)
    return f"{g} groups of [{', '.join(order)}] chunks with {n} heads, but {roles} with {n2}"


def _attention_module(found: Derivation, model, inputs, block, names: list[str]) -> None:
    found.attention_module = common_parent(names)
    if not found.attention_module:
        found.refuse({"attention_branches"}, f"the attention projections {names} have no module of their own")
        return
    output = output_of(model, inputs, block.get_submodule(found.attention_module))
    if isinstance(output, tuple) and len(output) in (1, 2):  # (output, weights), or (output,) (XLM): read by index
        found.removed_attention_output = "zeros_and_none"
    elif isinstance(output, torch.Tensor):
        found.removed_attention_output = "zeros"
    else:
        found.refuse({"attention_branches"}, f"{found.attention_module} returns {type(output).__name__}")


def _head_parameters(found: Derivation, block: nn.Module, heads: int, projections: list[str]) -> None:
    """Every parameter of the attention module but its projections' with exactly one dimension of size `heads`
    (`found.head_parameters`): sliced with its query head (a relative-position bias `(buckets, n)`, sinks `(n,)`,
    per-head biases `(n, d)`, a per-head convolution `(n, 1, k, 1)`). One with several such dimensions cannot be
    read: heads are refused. Verification decides whether the slicing is exact."""
    if not found.attention_module:
        return
    prefix = found.attention_module + "."
    owned = tuple(name + "." for name in projections)
    for name, parameter in block.get_submodule(found.attention_module).named_parameters():
        name = prefix + name
        dims = [i for i, size in enumerate(parameter.shape) if size == heads]
        if name.startswith(owned) or not dims:
            continue
        if len(dims) > 1:
            found.refuse(ATTENTION_KINDS, f"{name} {tuple(parameter.shape)} has several dimensions of the head count")
            return
        found.head_parameters += ((name, dims[0]),)


def _head_width_parameters(found: Derivation, model, inputs, block, n: int, d: int, projections: list[str]) -> None:
    """Every parameter of the attention module but its projections' with one dimension of the query width `n·d`
    whose entry `d + 1` (head 1) reaches only head 1's columns of the output projection (DeBERTa's `q_bias`,
    `v_bias`, added per head): `found.head_width_parameters`, sliced `d` entries per head. One over the stream
    (a LayerNorm after the output projection, as wide when `n·d = H`) reaches nothing there and is left whole."""
    if not found.attention_module:
        return
    prefix, owned = found.attention_module + ".", tuple(name + "." for name in projections)
    head = set(range(d, 2 * d))
    for name, parameter in block.get_submodule(found.attention_module).named_parameters():
        name = prefix + name
        dims = [i for i, size in enumerate(parameter.shape) if size == n * d]
        if name.startswith(owned) or len(dims) != 1 or n in parameter.shape:
            continue
        reached = parameter_reach(model, inputs, block, name, dims[0], d + 1, found.o_proj)
        if reached and reached <= head:
            found.head_width_parameters += ((name, dims[0]),)


def _head_dim_attribute(found: Derivation, block: nn.Module, head_dim: int) -> None:
    """The module (under the attention module) and integer attribute holding the head size; where none holds it
    (the forward splits by `width // n_head`), the head size itself."""
    root = block.get_submodule(found.attention_module) if found.attention_module else block
    prefix = f"{found.attention_module}." if found.attention_module else ""
    for name, module in root.named_modules():
        for attribute in HEAD_DIM_ATTRIBUTES:
            if getattr(module, attribute, None) == head_dim and not isinstance(getattr(module, attribute), bool):
                found.heads_module = (prefix + name).rstrip(".") or None
                found.head_dim_attribute = attribute
                return
    if not found.attention_module:
        found.refuse(
            ATTENTION_KINDS - {"attention_branches"},
            f"no attribute of the block holds the head size {head_dim}, and its attention has no module of its own",
        )
        return
    found.head_dim = head_dim
