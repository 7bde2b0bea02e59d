"""Model patching by module replacement through a registry (float type -> quant wrapper).

A PTQ method describes what to quantize with a *plan*: a function ``plan(name, module)`` that
returns a ``LayerQuant`` (or None to leave the module alone). ``quantize_model`` walks the model
once and replaces every planned module with its registered wrapper. A planned module whose type
has no registered patcher is an error, never silently skipped.

timm attention (ViT/DeiT ``Attention``, Swin ``WindowAttention``) is patched in place: its class
is swapped for a subclass whose forward runs the two matmuls explicitly through QuantMatMul
(q @ k^T and attn @ v), so timm's fused SDPA path can never bypass them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention

from .modules import QuantConv2d, QuantLinear, QuantMatMul
from .quantizer import QuantSpec


@dataclass(frozen=True)
class LayerQuant:
    """What one module gets. For Linear/Conv2d: ``weight`` and ``act`` (its input). For attention:
    ``qk`` = specs of (q, k^T) operands of q @ k^T, ``pv`` = specs of (attn, v) of attn @ v."""

    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    qk: tuple[QuantSpec | None, QuantSpec | None] | None = None
    pv: tuple[QuantSpec | None, QuantSpec | None] | None = None


PATCHERS: dict[type, Callable[[nn.Module, LayerQuant, int], nn.Module]] = {}


def register_patcher(float_type: type):
    """Register ``fn(module, layer_quant, max_elements) -> replacement`` for ``float_type``."""

    def deco(fn):
        PATCHERS[float_type] = fn
        return fn

    return deco


@register_patcher(nn.Linear)
def _patch_linear(m, lq: LayerQuant, max_elements):
    return QuantLinear(m, lq.weight, lq.act, max_elements)


@register_patcher(nn.Conv2d)
def _patch_conv(m, lq: LayerQuant, max_elements):
    return QuantConv2d(m, lq.weight, lq.act, max_elements)


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


def _swap_attention(cls):
    def patch(m, lq: LayerQuant, max_elements):
        m.__class__ = cls
        m.fused_attn = False
        qk = lq.qk or (None, None)
        pv = lq.pv or (None, None)
        m.matmul1 = QuantMatMul(qk[0], qk[1], max_elements)
        m.matmul2 = QuantMatMul(pv[0], pv[1], max_elements)
        return m

    return patch


register_patcher(Attention)(_swap_attention(QuantAttention))
register_patcher(WindowAttention)(_swap_attention(QuantWindowAttention))


def _set_submodule(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, plan: Callable[[str, nn.Module], LayerQuant | None], max_elements: int = 2**23) -> dict[str, str]:
    """Replace every module the plan names by its quant wrapper (in place). Returns {name: wrapper type}."""
    patched = {}
    for name, module in list(model.named_modules()):
        lq = plan(name, module)
        if lq is None:
            continue
        patcher = None
        for t in type(module).__mro__:
            if t in PATCHERS and not isinstance(module, (QuantAttention, QuantWindowAttention)):
                patcher = PATCHERS[t]
                break
        if patcher is None:
            raise TypeError(
                f"cannot quantize module '{name}' of type {type(module).__name__}: no wrapper is registered for it. "
                f"Register one with qwt.quant.patch.register_patcher({type(module).__name__}), or change the PTQ plan to skip it."
            )
        new = patcher(module, lq, max_elements)
        if new is not module:
            _set_submodule(model, name, new)
        patched[name] = type(new).__name__
    return patched


def explicit_attention_count(model: nn.Module) -> int:
    return sum(isinstance(m, (QuantAttention, QuantWindowAttention)) for m in model.modules())
