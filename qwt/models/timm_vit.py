"""ViT / DeiT (incl. distilled) from timm: units are ``blocks.i``; a batch is an image tensor."""
from timm.layers import Attention

from . import timm_attention
from .base import ModelAdapter, State, Unit


class TimmViTAdapter(ModelAdapter):
    def stem(self, x):
        m = self.model
        return State(m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))))

    def units(self):
        return [Unit(f"blocks.{i}") for i in range(len(self.model.blocks))]

    def head(self, state):
        return self.model.forward_head(self.model.norm(state.h))

    def features(self, state):
        return self.model.forward_head(self.model.norm(state.h), pre_logits=True)

    def trainable_head(self):
        return [n for n in ("head", "head_dist") if hasattr(self.model, n)]

    def edge_layers(self):
        return {"patch_embed.proj", *self.trainable_head()}

    def attention_types(self):
        return (Attention,)

    def patchers(self):
        return timm_attention.PATCHERS

    def norm_linear_pairs(self):
        pairs = []
        for i in range(len(self.model.blocks)):
            pairs += [(f"blocks.{i}.norm1", [f"blocks.{i}.attn.qkv"]), (f"blocks.{i}.norm2", [f"blocks.{i}.mlp.fc1"])]
        return pairs

    def extra_precond(self, sites):
        return timm_attention.value_proj_sites(self.model, sites)
