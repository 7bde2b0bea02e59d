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
from ..errors import ConfigError
from ..quant import LayerQuant, QuantSpec, observe_activations, quant_modules, quantize_model, set_quant_state
from ..quant.modules import calibrate_on_first_call
from ..quant.modules import _QuantWeighted

FLOAT_ACT_BITS = 16  # a_bits >= this: activations stay float (weight-only quantization)
# configs/numerics/*.yaml (items 1-7 act in stage 1; solver and branch_precision are QwT's)
NUMERICS_KEYS = {"name", "calibration_path", "reparam_zero", "quantile", "attention_scale", "reparam_bias",
                 "log_zero", "uniform_range", "solver", "branch_precision", "edge_layers"}
# the project's default profile (= configs/numerics/default.yaml): the reference code's behaviour
# where it is the published method (1, 2, 9, 10), the project's arithmetic elsewhere
NUMERICS_DEFAULT = {"name": "default", "calibration_path": "quantized", "reparam_zero": "float", "quantile": "exact",
                    "attention_scale": "before", "reparam_bias": "ours", "log_zero": "zero", "uniform_range": "ours",
                    "solver": "cholesky", "branch_precision": "fp16_eval", "edge_layers": "reference"}


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
    # "w8a8": edge layers (patch embedding / first conv, classifier) at W8A8 when keep_8bit;
    # "repq_vit": the official RepQ-ViT quantizer rule: the patch embedding (a Conv2d) gets an 8-bit
    # input and run-bits weights, the classifier the run's bits (there every Conv2d is an edge layer)
    edge_rule: str = "w8a8"
    options: dict = field(default_factory=dict)

    def with_numerics(self, numerics: dict | None) -> "MethodSpecs":
        """Apply a numerics profile (``configs/numerics/``): quantile arithmetic, uniform-range rule
        and log floor of RepQ-ViT's quantizers (estimator percentile_search / log-sqrt2), where the
        activation ranges are calibrated, where the attention scale is applied, and RepQ-ViT's
        reparameterization details (read by its hook from ``options``)."""
        n = dict(numerics or {})
        if not n:
            return self
        bad = set(n) - NUMERICS_KEYS
        if bad:
            raise ConfigError(f"unknown numerics option(s) {sorted(bad)}: the options are {sorted(NUMERICS_KEYS)}")
        ref_range = n.get("uniform_range", "ours") == "reference"

        def fix(spec):
            if spec is None:
                return None
            if spec.scheme == "log_sqrt2":
                return spec.with_(quantile=n.get("quantile", "exact"), log_floor=1e-6 if n.get("log_zero", "zero") == "floor" else 0.0)
            if spec.estimator == "percentile_search":
                return spec.with_(quantile=n.get("quantile", "exact"), zero_in_range=not ref_range, clamp_zero=not ref_range)
            return spec

        for role in ("weight", "act", "softmax", "matmul", "post_ln_act", "edge_act"):
            setattr(self, role, fix(getattr(self, role)))
        for key in ("calibration_path", "attention_scale", "reparam_zero", "reparam_bias"):
            if key in n:
                self.options[key] = n[key]
        if n.get("edge_layers", "w8a8") == "reference" and self.options.get("reference_edge_rule"):
            self.edge_rule = self.options["reference_edge_rule"]
        return self

    def weight_only(self) -> "MethodSpecs":
        """The same specs with every activation quantizer removed."""
        self.act = self.softmax = self.matmul = self.post_ln_act = self.edge_act = None
        self.options["weight_only"] = True
        return self


def _bits(spec: QuantSpec | None, bits: int | None) -> QuantSpec | None:
    if spec is None or bits is None:
        return spec
    return spec.with_(bits=int(bits))


def layer_quant(role: Role, specs: MethodSpecs, module: nn.Module | None = None) -> LayerQuant | None:
    if role.kind == "attention":
        if specs.matmul is None and specs.softmax is None:
            return None
        return LayerQuant(qk=(specs.matmul, specs.matmul), pv=(specs.softmax, specs.matmul),
                          scale_after=specs.options.get("attention_scale", "before") == "after")
    weight, act = specs.weight, specs.act
    if role.edge and specs.edge_rule == "repq_vit":
        if isinstance(module, nn.Conv2d):  # the patch embedding: 8-bit input, run-bits weights
            act = _bits(act, 8)
    elif role.edge and specs.keep_8bit:
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
        return None if role is None else layer_quant(role, specs, module)

    return plan


CALIBRATION_PATHS = ("quantized", "float")


@torch.no_grad()
def calibrate_activations(adapter: ModelAdapter, batches: list, store=None, path: str = "quantized"):
    """Activation ranges from one walk over the calibration batches, segment by segment.

    path="quantized" (the official code): weights and activations quantized; each quantizer takes
    its range from the first batch it sees (the reference calibrates on one batch), so quantizer k
    sees inputs that already passed quantizers 0..k-1. path="float": every quantizer observes the
    float values of all batches (weights unquantized; quantizers pass values through)."""
    model = adapter.model
    if path == "quantized":
        set_quant_state(model, weight=True, act=True)
        ctx = calibrate_on_first_call(model)
    elif path == "float":
        set_quant_state(model, weight=False, act=True)
        ctx = observe_activations(model)
    else:
        raise ConfigError(f"numerics.calibration_path={path!r}: use quantized (the reference) or float")
    with ctx:
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
        calibrate_activations(adapter, calib_batches, store, specs.options.get("calibration_path", "quantized"))
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
