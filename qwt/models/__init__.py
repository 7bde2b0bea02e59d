"""Block adapters (one per family) and model builders."""
from . import resnet, timm_swin, timm_vit  # noqa: F401  (register adapters)
from .base import ModelAdapter, Unit, adapter_for, register_adapter
