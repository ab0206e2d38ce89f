"""A randomly initialised Llama with SmolLM2-1.7B's shape, written shard by shard.

Hidden 2048, MLP 8192, 24 layers, 32 heads, 32 KV heads, vocabulary 49152, tied embeddings:
about 1.7B parameters, 6.8 GB in float32. One safetensors shard per layer (plus one for the
embeddings and the final norm) and the standard index json, so `from_pretrained` and the
low-memory pruner both read it. Only one layer's tensors are ever in memory, which is the
point: the checkpoint is for measuring what pruning a model larger than memory costs.
Resumable: finished shards are kept. Prints a table and writes JSON.

    python scripts/make_synthetic_checkpoint.py /tmp/synthetic-smollm2-1.7b
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

SMOLLM2_1_7B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 130000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "architectures": ["LlamaForCausalLM"],
}


def random_tensors(shapes: dict[str, torch.Size], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Normal(0, std) matrices as Llama's `_init_weights` draws them; norm weights are ones."""
    return {
        name: torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * std
        for name, shape in shapes.items()
    }


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    partial = path.with_suffix(".partial")
    save_file(tensors, partial, metadata={"format": "pt"})
    partial.replace(path)


def layer_shapes(config: LlamaConfig, index: int) -> dict[str, torch.Size]:
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, index)
    return {f"model.layers.{index}.{name}": tensor.shape for name, tensor in layer.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="output folder (outside the repository: ~7 GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/synthetic_checkpoint.json"))
    args = parser.parse_args()

    config = LlamaConfig(**SMOLLM2_1_7B)
    args.folder.mkdir(parents=True, exist_ok=True)
    count = config.num_hidden_layers + 1
    shapes = {
        "model.embed_tokens.weight": torch.Size((config.vocab_size, config.hidden_size)),
        "model.norm.weight": torch.Size((config.hidden_size,)),
    }
    shards = [shapes] + [layer_shapes(config, i) for i in range(config.num_hidden_layers)]
    weight_map, total_bytes, parameters = {}, 0, 0
    start = time.perf_counter()
    for number, shard_shapes in enumerate(tqdm(shards, desc="shards", unit="shard"), start=1):
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        path = args.folder / name
        if not path.exists():
            generator = torch.Generator().manual_seed(args.seed * 1000 + number)
            write_shard(path, random_tensors(shard_shapes, config.initializer_range, generator))
        for tensor_name, shape in shard_shapes.items():
            weight_map[tensor_name] = name
            parameters += shape.numel()
            total_bytes += shape.numel() * 4
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (args.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(args.folder)

    result = {
        "folder": str(args.folder.resolve()),
        "parameters": parameters,
        "float32_bytes": total_bytes,
        "shards": count,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
