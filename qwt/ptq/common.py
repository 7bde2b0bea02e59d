"""Shared stage-1 machinery: build a plan from per-role specs, patch, calibrate.

A method file (rtn.py, percentile.py, ...) only states its specs and, if it has one, a
post-calibration step (RepQ-ViT's reparameterization). ``apply_ptq`` does the rest:
  plan -> quantize_model -> weight ranges -> activation ranges (one observing pass over the
  calibration batches, float values passed through) -> method hook -> quantization on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import dist

from ..models.base import ModelAdapter
from ..quant import LayerQuant, QuantSpec, observe_activations, quant_modules, quantize_model, set_quant_state
from ..quant.modules import _QuantWeighted
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention


@dataclass
class MethodSpecs:
    """Specs for each role at the run's bit-widths."""

    weight: QuantSpec
    act: QuantSpec
    softmax: QuantSpec  # attn probabilities (first operand of attn @ v)
    matmul: QuantSpec  # q, k, v operands
    keep_8bit: bool = True  # patch embedding / first conv and classifier at W8A8
    post_ln_act: QuantSpec | None = None  # input spec of Linears fed by LayerNorm (RepQ-ViT: per-channel first)
    post_calibration: Callable | None = None  # hook(adapter, specs) after activation ranges are set
    options: dict = field(default_factory=dict)


ATTENTION_TYPES = (Attention, WindowAttention)


def build_plan(adapter: ModelAdapter, specs: MethodSpecs):
    eight = adapter.eight_bit_layers() if specs.keep_8bit else set()
    post_ln = {lin for _, lins in adapter.ln_linear_pairs() for lin in lins} if specs.post_ln_act is not None else set()

    def plan(name: str, module: nn.Module):
        if isinstance(module, ATTENTION_TYPES):
            return LayerQuant(qk=(specs.matmul, specs.matmul), pv=(specs.softmax, specs.matmul))
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if name in eight:
                return LayerQuant(weight=specs.weight.with_(bits=8), act=specs.act.with_(bits=8))
            act = specs.post_ln_act if name in post_ln else specs.act
            return LayerQuant(weight=specs.weight, act=act)
        return None

    return plan


@torch.no_grad()
def calibrate_activations(model: nn.Module, forward: Callable, batches: Iterable[torch.Tensor]):
    """One observing pass: activations see float values (weights unquantized)."""
    set_quant_state(model, weight=False, act=True)
    with observe_activations(model):
        for x in tqdm(batches, desc="ptq calibration", disable=not dist.is_main(), leave=False):
            forward(x)


def apply_ptq(adapter: ModelAdapter, specs: MethodSpecs, calib_batches: list[torch.Tensor], max_elements: int = 2**23) -> dict:
    """Quantize ``adapter.model`` in place with ``specs``; returns a small info dict."""
    model = adapter.model
    patched = quantize_model(model, build_plan(adapter, specs), max_elements)
    for m in quant_modules(model):
        if isinstance(m, _QuantWeighted):
            m.calibrate_weight()
    calibrate_activations(model, adapter.forward, calib_batches)
    if specs.post_calibration is not None:
        specs.post_calibration(adapter, specs)
    set_quant_state(model, weight=True, act=True)
    return {"patched_modules": len(patched)}
