"""Shared stage-1 machinery: a plan from the adapter's roles and the method's specs, patching,
calibration through the layer-wise engine.

A method file (rtn.py, percentile.py, ...) states its specs and, if it has them, a
post-calibration step (RepQ-ViT's reparameterization) and a data-driven weight step (GPTQ).
``apply_ptq`` does the rest:
  plan -> quantize_model -> weight ranges -> activation ranges (walk of the calibration batches,
  float values passed through) -> method hook -> data-driven weights -> quantization on.
Activations wider than 15 bits are not quantized at all (``bits=w4a16`` is weight-only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..engine import LayerwiseEngine
from ..models.base import ModelAdapter, Role
from ..quant import LayerQuant, QuantSpec, observe_activations, quant_modules, quantize_model, set_quant_state
from ..quant.modules import _QuantWeighted

FLOAT_ACT_BITS = 16  # a_bits >= this: activations stay float (weight-only quantization)


@dataclass
class MethodSpecs:
    """Specs for each role at the run's bit-widths (None: that role is not quantized)."""

    weight: QuantSpec
    act: QuantSpec | None
    softmax: QuantSpec | None  # attn probabilities (first operand of attn @ v)
    matmul: QuantSpec | None  # q, k, v operands
    keep_8bit: bool = True  # edge layers (patch embedding / first conv, classifier) at W8A8
    post_ln_act: QuantSpec | None = None  # input spec of Linears fed by a norm (RepQ-ViT: per-channel first)
    post_calibration: Callable | None = None  # hook(adapter, specs) after activation ranges are set
    weight_step: Callable | None = None  # hook(adapter, batches, specs, ctx) that sets weights from data (GPTQ)
    edge_act: QuantSpec | None = None  # input spec of edge layers (default: act at 8 bits)
    options: dict = field(default_factory=dict)

    def weight_only(self) -> "MethodSpecs":
        """The same specs with every activation quantizer removed."""
        self.act = self.softmax = self.matmul = self.post_ln_act = self.edge_act = None
        self.options["weight_only"] = True
        return self


def _bits(spec: QuantSpec | None, bits: int | None) -> QuantSpec | None:
    if spec is None or bits is None:
        return spec
    return spec.with_(bits=int(bits))


def layer_quant(role: Role, specs: MethodSpecs) -> LayerQuant | None:
    if role.kind == "attention":
        if specs.matmul is None and specs.softmax is None:
            return None
        return LayerQuant(qk=(specs.matmul, specs.matmul), pv=(specs.softmax, specs.matmul))
    weight, act = specs.weight, specs.act
    if role.edge and specs.keep_8bit:
        weight = weight.with_(bits=8)
        act = specs.edge_act or _bits(act, 8)
    elif role.post_norm and specs.post_ln_act is not None:
        act = specs.post_ln_act
    if not role.quantize_input or specs.act is None:
        act = None
    return LayerQuant(weight=_bits(weight, role.w_bits), act=_bits(act, role.a_bits))


def build_plan(adapter: ModelAdapter, specs: MethodSpecs):
    roles = adapter.quant_roles()

    def plan(name: str, module: nn.Module):
        role = roles.get(name)
        return None if role is None else layer_quant(role, specs)

    return plan


@torch.no_grad()
def calibrate_activations(adapter: ModelAdapter, batches: list, store=None):
    """Activation ranges from one walk over the calibration batches: every quantizer observes the
    float values passing (weights unquantized), segment by segment."""
    model = adapter.model
    set_quant_state(model, weight=False, act=True)
    with observe_activations(model):
        for _ in LayerwiseEngine(adapter, batches, kinds=("stem", "unit", "head"), store=store, desc="ptq calibration", finish=True):
            pass


def apply_ptq(adapter: ModelAdapter, specs: MethodSpecs, calib_batches: list, max_elements: int = 2**23,
              store=None, settings: dict | None = None) -> dict:
    """Quantize ``adapter.model`` in place with ``specs``; returns a small info dict."""
    model = adapter.model
    patched = quantize_model(model, build_plan(adapter, specs), max_elements, patchers=adapter.patchers())
    for m in quant_modules(model):
        if isinstance(m, _QuantWeighted):
            m.calibrate_weight()
    if any(not q.calibrated for m in quant_modules(model) for q in _act_quantizers_of(m)):
        calibrate_activations(adapter, calib_batches, store)
    if specs.post_calibration is not None:
        specs.post_calibration(adapter, specs)
    info = {"patched_modules": len(patched), "weight_only": specs.act is None}
    if specs.weight_step is not None:
        info.update(specs.weight_step(adapter, calib_batches, specs, dict(settings or {}), store) or {})
    set_quant_state(model, weight=True, act=True)
    return info


def _act_quantizers_of(m):
    from ..quant.modules import _act_quantizers

    return _act_quantizers(m)
