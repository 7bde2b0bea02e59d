"""Swin from timm: units are every block of every stage; a stage's PatchMerging is the ``pre``
of its first block and is not compensated. A batch is an image tensor."""
import torch.nn as nn
from timm.models.swin_transformer import WindowAttention

from . import timm_attention
from .base import ModelAdapter, State, Unit


class TimmSwinAdapter(ModelAdapter):
    def stem(self, x):
        m = self.model
        h = m.patch_embed(x)
        if getattr(m, "absolute_pos_embed", None) is not None:
            h = h + m.absolute_pos_embed
        return State(h)

    def _has_downsample(self, s):
        return not isinstance(self.model.layers[s].downsample, nn.Identity)

    def units(self):
        out = []
        for s, stage in enumerate(self.model.layers):
            for j in range(len(stage.blocks)):
                pre = f"layers.{s}.downsample" if j == 0 and self._has_downsample(s) else None
                out.append(Unit(f"layers.{s}.blocks.{j}", pre))
        return out

    def head(self, state):
        return self.model.forward_head(self.model.norm(state.h))

    def features(self, state):
        return self.model.forward_head(self.model.norm(state.h), pre_logits=True)

    def trainable_head(self):
        return ["head.fc"]

    def edge_layers(self):
        return {"patch_embed.proj", "head.fc"}

    def attention_types(self):
        return (WindowAttention,)

    def patchers(self):
        return timm_attention.PATCHERS

    def norm_linear_pairs(self):
        pairs = []
        for s, stage in enumerate(self.model.layers):
            if self._has_downsample(s):
                pairs.append((f"layers.{s}.downsample.norm", [f"layers.{s}.downsample.reduction"]))
            for j in range(len(stage.blocks)):
                b = f"layers.{s}.blocks.{j}"
                pairs += [(f"{b}.norm1", [f"{b}.attn.qkv"]), (f"{b}.norm2", [f"{b}.mlp.fc1"])]
        return pairs

    def extra_precond(self, sites):
        return timm_attention.value_proj_sites(self.model, sites)
