"""ViT / DeiT (incl. distilled) from timm: units are ``blocks.i``."""
from timm.models.vision_transformer import VisionTransformer

from .base import ModelAdapter, Unit, register_adapter


@register_adapter(VisionTransformer)
class TimmViTAdapter(ModelAdapter):
    family = "vit"

    def stem(self, x):
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def units(self):
        return [Unit(f"blocks.{i}") for i in range(len(self.model.blocks))]

    def head(self, h):
        return self.model.forward_head(self.model.norm(h))

    def pre_logits(self, h):
        return self.model.forward_head(self.model.norm(h), pre_logits=True)

    def classifier_names(self):
        return [n for n in ("head", "head_dist") if hasattr(self.model, n)]

    def eight_bit_layers(self):
        return {"patch_embed.proj", *self.classifier_names()}

    def ln_linear_pairs(self):
        pairs = []
        for i in range(len(self.model.blocks)):
            pairs += [(f"blocks.{i}.norm1", [f"blocks.{i}.attn.qkv"]), (f"blocks.{i}.norm2", [f"blocks.{i}.mlp.fc1"])]
        return pairs
