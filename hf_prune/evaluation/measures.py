"""Quality, size and speed measurements: perplexity under the project's WikiText-2 protocol, parameter and FLOP
counts, latency, image top-1 (kept in the package: `evaluate`'s perplexity reloads models by name)."""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..calibration.data import wikitext2_test_text
from ..calibration.images import pixel_values
from ..groups import get_adapter
from ..groups.experts import experts_per_token

#: The project's WikiText-2 protocol (dense SmolLM2-135M-Instruct: 29.52 at 80 windows).
WIKITEXT2_DATASET = "Salesforce/wikitext"
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"
#: Attention context `flops_per_token` assumes unless told.
FLOPS_CONTEXT = 512


def parameter_count(model: nn.Module) -> int:
    """Parameters, each tied tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: nn.Module, context: int = FLOPS_CONTEXT) -> int:
    """Forward FLOPs per token (2 per multiply-add) with `context` tokens of attention context.

    Every `Linear` / `Conv1D` weight is one multiply-add per token and a patch-embedding `Conv2d`
    one per patch; each attention layer adds QKᵀ and AV, `2 · heads · head_dim · context`, with
    the head counts read per layer from the adapter. Counting the weights present makes fused,
    gated and pruned projections exact; embedding lookups, norms, activations and softmax are
    left out (a few per cent at most). A mixture-of-experts layer adds its router (`E · H`, when it is
    not a `Linear`) and, per token, `num_experts_per_tok` experts' weights (the fused expert tensors'
    slice of one expert; with a per-expert module list, `num_experts_per_tok` entries' `Linear`s instead of all):
    removing experts leaves the FLOPs per token unchanged, neurons inside experts lower them.
    """
    adapter = get_adapter(model.config)
    macs = sum(
        module.weight.numel() for module in model.modules() if isinstance(module, (nn.Linear, Conv1D, nn.Conv2d))
    )
    for layer in adapter.layers(model):
        attention = adapter.geometry(layer).attention
        if attention is not None:
            macs += 2 * attention.num_heads * attention.head_dim * context
        experts = adapter.experts_of(layer)
        if experts and experts.per_expert:  # every entry's Linears were counted: a token runs top-k of them
            top_k = experts_per_token(model.config) or 1
            entries = layer.get_submodule(experts.experts_module)
            linears = [m for m in entries[0].modules() if isinstance(m, (nn.Linear, Conv1D))]
            macs -= (len(entries) - top_k) * sum(m.weight.numel() for m in linears)
        elif experts:
            top_k = experts_per_token(model.config) or 1
            weights = [layer.get_parameter(t.parameter) for t in experts.tensors]
            macs += top_k * sum(weight[0].numel() for weight in weights if weight.dim() == 3)
            if not isinstance(layer.get_submodule(experts.router), nn.Linear):
                macs += layer.get_parameter(experts.router_parameters[0]).numel()
    return 2 * macs


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


def wikitext2_perplexity(model: nn.Module, tokenizer, windows: int = 80, seq_len: int = 512) -> float:
    """The project's protocol: the raw WikiText-2 test split as one string, tokenized in one call
    without special tokens, scored over its first `windows` windows of `seq_len` tokens."""
    ids = tokenizer(wikitext2_test_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return perplexity(model, ids, seq_len=seq_len, max_windows=windows)


def wikitext2_protocol(windows: int = 80, seq_len: int = 512) -> str:
    return (
        f"WikiText-2 raw test split, first {windows} non-overlapping windows of {seq_len} tokens, "
        "tokenized in one call without special tokens, each window scored on its own"
    )


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of one forward pass on `inputs`, in milliseconds, after `warmup` passes."""
    for _ in range(warmup):
        model(**inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def top1_of_pixels(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Fraction of already processed `pixel_values` the classifier labels correctly."""
    device = next(model.parameters()).device
    correct = 0
    for start in tqdm(range(0, len(labels), batch_size), desc="top-1", unit="batch", leave=False):
        logits = model(pixel_values=pixels[start : start + batch_size].to(device)).logits
        correct += (logits.argmax(-1).cpu() == labels[start : start + batch_size]).sum().item()
    return correct / len(labels)


def top1_accuracy(model: nn.Module, images, processor, batch_size: int = 250) -> float:
    """Fraction of an `hf_prune.calibration.images.ImageSet` the classifier labels correctly, the uint8 images
    passed through the model's image processor as at inference time."""
    return top1_of_pixels(model, pixel_values(images.images, processor), images.labels, batch_size)


@torch.no_grad()
def image_flops(model: nn.Module, pixels: torch.Tensor) -> int:
    """Forward FLOPs (2 per multiply-add) of one image, measured by hooks on one forward pass.

    Every convolution and linear layer counts its output elements times its fan-in; attention
    adds QKᵀ and AV, `2 · tokens² · width` per layer, read from the query projection's output.
    Norms, activations and pooling are left out (a few per cent at most).
    """
    adapter = get_adapter(model.config)
    queries = {id(layer.get_submodule(adapter.q_proj)) for layer in adapter.layers(model)} if adapter.q_proj else set()
    macs = 0

    def count(module, args, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output.numel() * module.weight[0].numel()
        else:
            macs += output.numel() * module.weight.shape[1]
            if id(module) in queries:  # (batch, tokens, width): QKᵀ and AV
                macs += 2 * output.shape[1] * output.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        model(pixel_values=pixels[:1])
    finally:
        for handle in handles:
            handle.remove()
    return 2 * macs
