"""timm attention with explicit, quantizable matmuls (imported with the timm adapters only).

ViT/DeiT ``Attention`` and Swin ``WindowAttention`` are patched in place: the class is swapped for
a subclass whose forward runs q @ k^T and attn @ v through ``QuantMatMul``, so timm's fused SDPA
path can never bypass them.
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention

from ..quant.modules import QuantMatMul
from ..quant.patch import LayerQuant


class QuantAttention(Attention):
    """timm ``Attention`` with explicit, quantizable matmuls."""

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("QuantAttention: attention masks are not supported (not used by ViT/DeiT classification)")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.scale_after:  # the reference code: q @ k^T first, then the scale
            attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        else:
            attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x) if hasattr(self, "norm") else x
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(WindowAttention):
    """timm Swin ``WindowAttention`` with explicit, quantizable matmuls."""

    def forward(self, x, mask=None):
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.scale_after:
            attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        else:
            attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


EXPLICIT = (QuantAttention, QuantWindowAttention)


def _swap_attention(cls):
    def patch(m, lq: LayerQuant, max_elements):
        if isinstance(m, EXPLICIT):
            raise TypeError(f"{type(m).__name__} is already patched: quantize a fresh float model")
        m.__class__ = cls
        m.fused_attn = False
        qk = lq.qk or (None, None)
        pv = lq.pv or (None, None)
        m.matmul1 = QuantMatMul(qk[0], qk[1], max_elements)
        m.matmul2 = QuantMatMul(pv[0], pv[1], max_elements)
        m.scale_after = bool(lq.scale_after)
        return m

    return patch


PATCHERS = {Attention: _swap_attention(QuantAttention), WindowAttention: _swap_attention(QuantWindowAttention)}


def explicit_attention_count(model: nn.Module) -> int:
    return sum(isinstance(m, EXPLICIT) for m in model.modules())


def value_proj_sites(model: nn.Module, sites) -> list:
    """QFT's "v_proj" sites: the v part of a fused qkv Linear -> attn.proj (attention is linear in
    v: the softmax weights mix tokens, not channels)."""
    from .base import fused_qkv_value_site

    if "v_proj" not in sites:
        return []
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, EXPLICIT):
            continue
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            continue  # a norm between attn @ v and proj breaks the linearity
        if proj is None or getattr(qkv, "out_features", None) != 3 * getattr(proj, "in_features", -1):
            continue
        site = fused_qkv_value_site(name, qkv, proj)
        if site is not None:
            out.append(site)
    return out
