"""DeiT encoders: ViT's layers (q/k/v/o, `fc1`/`fc2`) plus a distillation token and classifier.

The distillation token and its classifier read the hidden width, which no group prunes, so the
ViT groups apply unchanged; `DeiTForImageClassificationWithTeacher` averages both classifiers.
"""

from .registry import register_adapter
from .vit import ViTAdapter


@register_adapter
class DeiTAdapter(ViTAdapter):
    model_types = ("deit",)
