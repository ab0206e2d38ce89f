"""Build the reference mixture-of-experts model (issue 16, item 6): SmolLM2-135M upcycled into a Mixtral.

MoEfication (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts",
arXiv:2110.01786): each layer's gated MLP `down(σ(gate x) ⊙ up x)` is a sum over its `I` neurons, so
splitting the neurons into `E` sets of `I/E` gives experts `f_j` with `Σ_j f_j(x) = MLP(x)`. In Mixtral's
block (`MixtralTopKRouter`: softmax over the router logits, top-k, weights renormalised to sum 1) a zero
router with all `E` experts active gives every expert the weight `1/E`, so down projections scaled by `E`
make the MoE equal the dense MLP exactly (`moefy`; `tests/test_reference_moe.py` checks it). With top-k
`k < E` the renormalised weights are about `1/k` each, so the down projections are scaled by `k` instead:
with a uniform gate the block then adds `Σ_{j ∈ topk} f_j(x)`, the selected part of the dense MLP.

Steps: (1) neurons are grouped into experts, `--split contiguous` (blocks of `I/E`) or `cluster` (balanced
k-means on each neuron's mean-normalised |activation| over calibration tokens: neurons that fire together
share an expert, MoEfication's co-activation grouping); (2) the router is fitted by least squares to predict
each expert's output norm `‖f_j(x)‖` from the block input (MoEfication's router that predicts the experts'
contributions), times `--router-scale`. Measured before training (held-out validation windows, dense
SmolLM2 23.5 on 2 windows): at scale 1e-3, top-4 of 8 gave perplexity 230 with clusters against 1,865 with
contiguous blocks, top-2 58,405, top-6 41.6; at scale 1 the uneven weights times `k` gave 30,797 for
top-4. On the 8 windows of the run, top-4 started at 317 with scale 1e-3, but its first router step at lr
1e-3 scrambled the tiny logits (loss 5.7 → 8.2); the default, scale 0.1 with router lr 1e-4, starts at
1,563 and trains stably (0.1 was not tuned further); (3) the model is
trained for `--steps` steps on WikiText-2 *validation* text but its last `--held-out` windows (the only
training text in the data folder; the test split is never read here): router and experts (`--train
experts`), the router only, or every weight but the embeddings, AdamW, Mixtral's load-balancing loss
(`router_aux_loss_coef`) added. Deterministic for a seed and thread count.

The folder gets `config.json`, `model.safetensors`, the tokenizer and `reference_moe.json` (every setting,
the seconds, the training loss curve and validation perplexities). Weights are never committed
(`outputs/` is git-ignored); rerun the script to regenerate them.

    python scripts/make_reference_moe.py --output outputs/reference-moe
    python scripts/make_reference_moe.py --model tiny --steps 2 --output outputs/reference-moe-tiny  # plumbing
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from results_file import LANGUAGE_MODELS, command_line, language_model
from torch import nn
from tqdm import tqdm
from transformers import MixtralConfig, MixtralForCausalLM

from hf_prune.calibration.data import data_file
from hf_prune.errors import UnsupportedArchitectureError
from hf_prune.evaluation import perplexity

#: Tokens per evaluation window (the project's WikiText-2 protocol).
SEQ_LEN = 512


def mixtral_config(dense, experts: int, top_k: int) -> MixtralConfig:
    """A Mixtral config with `dense`'s (a Llama config's) attention, norms and vocabulary, and its MLP width
    split into `experts` experts of `intermediate_size / experts` neurons, `top_k` of them per token."""
    if dense.model_type != "llama" or dense.attention_bias or dense.mlp_bias:
        raise UnsupportedArchitectureError(
            f"MoEfication here reads a Llama without biases; got model_type={dense.model_type!r}, "
            f"attention_bias={dense.attention_bias}, mlp_bias={dense.mlp_bias}: pass a Llama checkpoint."
        )
    if dense.intermediate_size % experts or not 1 <= top_k <= experts:
        raise UnsupportedArchitectureError(
            f"experts={experts}, top_k={top_k}: experts must divide intermediate_size={dense.intermediate_size} "
            f"and 1 <= top_k <= experts."
        )
    return MixtralConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size // experts,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=dense.rms_norm_eps,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        tie_word_embeddings=dense.tie_word_embeddings,
        rope_parameters=dict(dense.rope_parameters),
        sliding_window=None,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


@torch.no_grad()
def moefy(dense: nn.Module, experts: int, top_k: int | None = None, orders: list[torch.Tensor] | None = None):
    """`dense` (a `LlamaForCausalLM`) as a `MixtralForCausalLM`: attention, norms and embeddings copied, layer
    `l`'s MLP neurons `orders[l]` (default: in order) cut into `experts` consecutive sets, one expert each, the
    router zero and every down projection scaled by `top_k` (default `experts`: all experts active, where the
    MoE equals the dense model exactly, each expert weighted `1/E` by the softmax of equal logits)."""
    top_k = experts if top_k is None else top_k
    config = mixtral_config(dense.config, experts, top_k)
    moe = MixtralForCausalLM(config).to(next(dense.parameters()).dtype)
    state = {name: tensor for name, tensor in dense.state_dict().items() if ".mlp." not in name}
    hidden, width = config.hidden_size, config.intermediate_size
    for index, layer in enumerate(dense.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{index}.mlp."
        order = torch.arange(experts * width) if orders is None else orders[index]
        gate = mlp.gate_proj.weight[order].view(experts, width, hidden)
        up = mlp.up_proj.weight[order].view(experts, width, hidden)
        down = mlp.down_proj.weight[:, order].view(hidden, experts, width).permute(1, 0, 2)
        state[prefix + "experts.gate_up_proj"] = torch.cat([gate, up], dim=1)  # Mixtral chunks gate, then up
        state[prefix + "experts.down_proj"] = down * top_k
        state[prefix + "gate.weight"] = torch.zeros(experts, hidden, dtype=gate.dtype)
    moe.load_state_dict(state, strict=True)
    return moe.eval()


@torch.no_grad()
def mlp_inputs(dense: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's MLP input (after the post-attention norm) on `windows`, tokens flattened: `[T, H]`."""
    seen: list[list[torch.Tensor]] = [[] for _ in dense.model.layers]
    handles = [
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].flatten(0, 1).float()))
        for i, layer in enumerate(dense.model.layers)
    ]
    try:
        for batch in windows.split(4):
            dense(batch)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in seen]


def neuron_activations(mlp: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """`σ(gate x) ⊙ up x` for every token and neuron: `[T, I]`."""
    weight = mlp.gate_proj.weight.float()
    return mlp.act_fn(inputs @ weight.T) * (inputs @ mlp.up_proj.weight.float().T)


def balanced_clusters(features: torch.Tensor, experts: int, seed: int, iterations: int = 10) -> torch.Tensor:
    """Neurons (rows of `features`, unit norm) in `experts` clusters of equal size: k-means on cosine
    similarity with a capacity per cluster (each step fills the clusters greedily, most similar pairs first).
    Returns the neuron order, cluster by cluster."""
    neurons = features.shape[0]
    capacity = neurons // experts
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(neurons, generator=generator)[:experts]]
    for _ in range(iterations):
        similarity = features @ centroids.T
        ranked = similarity.flatten().argsort(descending=True).tolist()
        chosen, filled = [-1] * neurons, [0] * experts
        for pair in ranked:
            neuron, expert = divmod(pair, experts)
            if chosen[neuron] < 0 and filled[expert] < capacity:
                chosen[neuron] = expert
                filled[expert] += 1
        assignment = torch.tensor(chosen)
        centroids = torch.stack([features[assignment == e].mean(0) for e in range(experts)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.cat([(assignment == e).nonzero().flatten() for e in range(experts)])


@torch.no_grad()
def initialise(dense: nn.Module, moe: nn.Module, inputs: list[torch.Tensor], split: str, scale: float, seed: int):
    """Group the neurons (`split`) and fit the routers; returns the neuron orders and each layer's R² of the
    router's least-squares fit of the experts' output norms."""
    experts = moe.config.num_local_experts
    orders, fits = [], []
    for index, layer in enumerate(dense.model.layers):
        activations = neuron_activations(layer.mlp, inputs[index])
        if split == "cluster":
            features = activations.abs().T
            features = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)
            orders.append(balanced_clusters(features, experts, seed + index))
        else:
            orders.append(torch.arange(activations.shape[1]))
    fresh = moefy(dense, experts, moe.config.num_experts_per_tok, orders)
    moe.load_state_dict(fresh.state_dict())
    for index, layer in enumerate(dense.model.layers):
        # Router: least squares from the block input to each expert's output norm ‖f_j(x)‖ (mean 1).
        order = orders[index]
        activations = neuron_activations(layer.mlp, inputs[index])[:, order]
        down = layer.mlp.down_proj.weight.float()[:, order]
        width = activations.shape[1] // experts
        norms = torch.stack(
            [
                (activations[:, e * width : (e + 1) * width] @ down[:, e * width : (e + 1) * width].T).norm(dim=1)
                for e in range(experts)
            ],
            dim=1,
        )
        targets = norms / norms.mean()
        solution = torch.linalg.lstsq(inputs[index], targets).solution  # [H, E]
        residual = targets - inputs[index] @ solution
        fits.append(1 - residual.pow(2).sum().item() / (targets - targets.mean(0)).pow(2).sum().item())
        moe.model.layers[index].mlp.gate.weight.copy_(scale * solution.T.to(moe.dtype))
    return orders, fits


def training_ids(tokenizer, held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """WikiText-2 validation tokens: all but the last `held_out` windows of `SEQ_LEN` (training), and those
    (held-out perplexity)."""
    text = data_file("wikitext-2/wiki.valid.tokens").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    cut = ids.numel() - held_out * SEQ_LEN
    return ids[:cut], ids[cut:]


def train(moe: nn.Module, ids: torch.Tensor, args, log: list) -> None:
    """`args.steps` AdamW steps on random `args.seq_len`-token windows of `ids` (batch `args.batch_size`), the
    language-model loss plus Mixtral's load-balancing loss; warm-up then cosine decay of the learning rates."""
    router = [p for n, p in moe.named_parameters() if n.endswith("mlp.gate.weight")]
    experts = [p for n, p in moe.named_parameters() if ".mlp.experts." in n]
    others = [p for n, p in moe.named_parameters() if ".mlp." not in n and "embed_tokens" not in n]
    groups = [{"params": router, "lr": args.router_lr}]
    if args.train in ("experts", "all"):
        groups.append({"params": experts, "lr": args.lr})
    if args.train == "all":
        groups.append({"params": others, "lr": args.lr})
    trained = {id(p) for group in groups for p in group["params"]}
    for parameter in moe.parameters():
        parameter.requires_grad_(id(parameter) in trained)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(args.seed)
    moe.config.router_aux_loss_coef = args.aux_coef
    moe.train()
    progress = tqdm(range(args.steps), desc="training", unit="step")
    for step in progress:
        starts = torch.randint(0, ids.numel() - args.seq_len, (args.batch_size,), generator=generator).tolist()
        batch = torch.stack([ids[s : s + args.seq_len] for s in starts])
        output = moe(batch, labels=batch, output_router_logits=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        language = output.loss.item() - args.aux_coef * output.aux_loss.item()
        log.append({"step": step + 1, "loss": round(language, 4), "aux_loss": round(output.aux_loss.item(), 4)})
        progress.set_postfix(loss=f"{language:.3f}", aux=f"{output.aux_loss.item():.3f}")
    moe.eval()
    for parameter in moe.parameters():
        parameter.requires_grad_(True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=LANGUAGE_MODELS, default="smollm2", help="tiny: random weights, plumbing")
    parser.add_argument("--output", default="outputs/reference-moe")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4, help="experts per token (num_experts_per_tok)")
    parser.add_argument("--split", choices=("contiguous", "cluster"), default="cluster")
    parser.add_argument("--router-scale", type=float, default=0.1, help="times the least-squares router")
    parser.add_argument("--init-windows", type=int, default=8, help="validation windows for grouping and router")
    parser.add_argument("--held-out", type=int, default=8, help="last validation windows kept for perplexity")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train", choices=("router", "experts", "all"), default="experts")
    parser.add_argument("--lr", type=float, default=1e-4, help="experts (and other weights with --train all)")
    parser.add_argument("--router-lr", type=float, default=1e-4)
    parser.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef while training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    settings = {**vars(args), "command": command_line(__file__, argv)}

    base = language_model(args.model)
    dense, tokenizer = base.model.float().eval(), base.tokenizer
    ids, held_out = training_ids(tokenizer, args.held_out)
    info: dict = {"settings": settings, "held_out_tokens": held_out.numel(), "training_tokens": ids.numel()}
    info["dense_perplexity"] = perplexity(dense, held_out)

    generator = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, ids.numel() - SEQ_LEN, (args.init_windows,), generator=generator).tolist()
    windows = torch.stack([ids[s : s + SEQ_LEN] for s in starts])
    moe = moefy(dense, args.experts)
    info["all_experts_max_logit_difference"] = (moe(windows[:1]).logits - dense(windows[:1]).logits).abs().max().item()
    moe = MixtralForCausalLM(mixtral_config(dense.config, args.experts, args.top_k)).eval()
    start = time.perf_counter()
    _, fits = initialise(dense, moe, mlp_inputs(dense, windows), args.split, args.router_scale, args.seed)
    info["initialise_seconds"] = time.perf_counter() - start
    info["router_fit_r2"] = [round(value, 4) for value in fits]
    info["initial_perplexity"] = perplexity(moe, held_out)
    print(
        f"dense {info['dense_perplexity']:.2f}, MoE top-{args.top_k} before training {info['initial_perplexity']:.2f}"
    )

    log: list = []
    start = time.perf_counter()
    train(moe, ids, args, log)
    info["training_seconds"] = time.perf_counter() - start
    info["training_log"] = log
    info["perplexity"] = perplexity(moe, held_out)
    print(f"MoE top-{args.top_k} after {args.steps} steps: held-out perplexity {info['perplexity']:.2f}")

    output = Path(args.output)
    moe.config.output_router_logits = False
    moe.save_pretrained(output)
    tokenizer.save_pretrained(output)
    info["seconds"] = time.perf_counter() - started
    (output / "reference_moe.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


if __name__ == "__main__":
    main()
