"""Tiny randomly initialised models, one per supported family, built from configs.

Shapes are chosen so that every pruning kind has something to remove: GQA families have
3 KV groups of 2 query heads, MHA families 4 heads, every MLP 48 neurons, 4 layers; the
convolutional families two stages of two blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

VOCAB = 97
#: Data-free choices for tests about structure: the defaults need a calibration pass.
STRUCTURAL = {"criterion": "magnitude", "reconstruct": "none"}


def calibration_windows(count: int = 8, length: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Random token windows: a calibration source for tiny models, which have no tokenizer."""
    return [torch.randint(3, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))]


def calibration_images(count: int = 8, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Random images for the tiny vision models."""
    return [torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))]


@dataclass(frozen=True)
class TinyFamily:
    model_type: str
    model_class: str
    auto_class: str
    config_class: str
    config: dict
    gqa: bool
    causal: bool = True
    vision: bool = False
    #: the PruningConfig amounts the family supports, when not a transformer's.
    convolutional_amounts: tuple[str, ...] = ()

    def build(self, seed: int = 0) -> transformers.PreTrainedModel:
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**self.config)
        model = getattr(transformers, self.model_class)(config).eval()
        # Random init leaves norms at 1 and biases at 0; perturb them so masking bugs show.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name.lower() or name.endswith("bias"):
                    parameter.add_(0.1 * torch.randn_like(parameter))
            for name, buffer in model.named_buffers():  # BatchNorm running statistics
                if name.endswith("running_mean"):
                    buffer.add_(0.1 * torch.randn_like(buffer))
                elif name.endswith("running_var"):
                    buffer.mul_(1 + 0.2 * torch.rand_like(buffer))
        return model

    def inputs(self, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        if self.vision:
            size = self.config.get("image_size", 16)
            return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
        # Ids from 3 up: avoid pad/special ids (RoBERTa derives positions from the pad id).
        return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator)}


_DECODER = dict(vocab_size=VOCAB, num_hidden_layers=4, intermediate_size=48, max_position_embeddings=64)
_GQA = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16)

FAMILIES: dict[str, TinyFamily] = {
    family.model_type: family
    for family in [
        TinyFamily("llama", "LlamaForCausalLM", "AutoModelForCausalLM", "LlamaConfig", {**_DECODER, **_GQA}, gqa=True),
        TinyFamily(
            "mistral",
            "MistralForCausalLM",
            "AutoModelForCausalLM",
            "MistralConfig",
            {**_DECODER, **_GQA, "sliding_window": 4},
            gqa=True,
        ),
        TinyFamily(
            "qwen2",
            "Qwen2ForCausalLM",
            "AutoModelForCausalLM",
            "Qwen2Config",
            {**_DECODER, **_GQA, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
            gqa=True,
        ),
        TinyFamily("qwen3", "Qwen3ForCausalLM", "AutoModelForCausalLM", "Qwen3Config", {**_DECODER, **_GQA}, gqa=True),
        TinyFamily(
            "gemma3_text",
            "Gemma3ForCausalLM",
            "AutoModelForCausalLM",
            "Gemma3TextConfig",
            {
                **_DECODER,
                **_GQA,
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                "query_pre_attn_scalar": 16,
            },
            gqa=True,
        ),
        TinyFamily(
            "phi3",
            "Phi3ForCausalLM",
            "AutoModelForCausalLM",
            "Phi3Config",
            {**_DECODER, **_GQA, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
            gqa=True,
        ),
        TinyFamily(
            "gpt2",
            "GPT2LMHeadModel",
            "AutoModelForCausalLM",
            "GPT2Config",
            dict(
                vocab_size=VOCAB,
                bos_token_id=1,
                eos_token_id=2,
                n_embd=64,
                n_head=4,
                n_layer=4,
                n_inner=48,
                n_positions=64,
            ),
            gqa=False,
        ),
        TinyFamily(
            "gpt_neox",
            "GPTNeoXForCausalLM",
            "AutoModelForCausalLM",
            "GPTNeoXConfig",
            dict(
                vocab_size=VOCAB,
                hidden_size=64,
                num_attention_heads=4,
                num_hidden_layers=4,
                intermediate_size=48,
                max_position_embeddings=64,
            ),
            gqa=False,
        ),
        TinyFamily(
            "bert",
            "BertForMaskedLM",
            "AutoModelForMaskedLM",
            "BertConfig",
            dict(
                vocab_size=VOCAB,
                hidden_size=64,
                num_attention_heads=4,
                num_hidden_layers=4,
                intermediate_size=48,
                max_position_embeddings=64,
            ),
            gqa=False,
            causal=False,
        ),
        TinyFamily(
            "roberta",
            "RobertaForMaskedLM",
            "AutoModelForMaskedLM",
            "RobertaConfig",
            dict(
                vocab_size=VOCAB,
                hidden_size=64,
                num_attention_heads=4,
                num_hidden_layers=4,
                intermediate_size=48,
                max_position_embeddings=64,
                pad_token_id=1,
            ),
            gqa=False,
            causal=False,
        ),
        TinyFamily(
            "vit",
            "ViTForImageClassification",
            "AutoModelForImageClassification",
            "ViTConfig",
            dict(
                image_size=16,
                patch_size=4,
                hidden_size=64,
                num_attention_heads=4,
                num_hidden_layers=4,
                intermediate_size=48,
                num_labels=10,
            ),
            gqa=False,
            causal=False,
            vision=True,
        ),
        TinyFamily(
            "deit",
            "DeiTForImageClassificationWithTeacher",
            "AutoModelForImageClassification",
            "DeiTConfig",
            {
                "image_size": 16,
                "patch_size": 4,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 4,
                "intermediate_size": 48,
                "num_labels": 10,
            },
            gqa=False,
            causal=False,
            vision=True,
        ),
        TinyFamily(
            "resnet",
            "ResNetForImageClassification",
            "AutoModelForImageClassification",
            "ResNetConfig",
            {"embedding_size": 8, "hidden_sizes": [16, 24], "depths": [2, 2], "layer_type": "basic", "num_labels": 10},
            gqa=False,
            causal=False,
            vision=True,
            convolutional_amounts=("channels", "stage_channels"),
        ),
        TinyFamily(
            "convnext",
            "ConvNextForImageClassification",
            "AutoModelForImageClassification",
            "ConvNextConfig",
            # layer_scale 1 (not 1e-6) so that every MLP neuron visibly changes the logits.
            {
                "hidden_sizes": [8, 16],
                "depths": [2, 2],
                "num_stages": 2,
                "num_labels": 10,
                "layer_scale_init_value": 1.0,
            },
            gqa=False,
            causal=False,
            vision=True,
            convolutional_amounts=("mlp_neurons", "layers", "stage_channels"),
        ),
    ]
}
