"""Quantized module wrappers: a Quantizer (one tensor's fake quantization), and
QuantLinear / QuantConv2d / QuantMatMul with per-module weight / activation on-off states.

Each wrapper keeps the float weights it replaced. Quantization off => the module computes
exactly what the float module computed (QwT runs the same block both ways on the same input).
Stage-2 methods that change the quantized path (QFT training, QwT-v2 folding) first call
``detach_fp()`` so that the float path keeps the original weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .observers import Observer
from .quantizer import QuantSpec, dynamic_qparams, fake_quant, grad_scale, quantize_codes


class Quantizer(nn.Module):
    """Fake-quantizes one tensor. States: observing (passes x through, records it), calibrated.
    A dynamic spec (``spec.dynamic``) needs no calibration: its parameters come from each input."""

    def __init__(self, spec: QuantSpec, max_elements: int = 2**23):
        super().__init__()
        self.spec = spec
        self.max_elements = max_elements
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self.observer: Observer | None = None
        self.init_on_call = False  # calibrate from the first tensor that passes, then quantize it (quantized-path calibration)
        self.ste = False  # straight-through rounding (set by methods that train)
        self.lsq = False  # scale is a Parameter with LSQ gradient scaling

    def extra_repr(self):
        s = self.spec
        return f"{s.scheme} {s.bits}b {'sym' if s.symmetric else 'asym'} {s.granularity} {s.estimator}"

    @property
    def calibrated(self) -> bool:
        return self.spec.dynamic or self.scale is not None

    def start_observing(self):
        self.observer = Observer(self.spec, self.max_elements)

    def finish_observing(self):
        if self.observer is None:
            raise RuntimeError("finish_observing() without start_observing()")
        scale, zero = self.observer.compute()
        self.observer = None
        self.set_params(scale, zero)

    def calibrate_from(self, x: torch.Tensor):
        """One-shot calibration on a tensor (weights)."""
        if self.spec.dynamic:
            return
        obs = Observer(self.spec, self.max_elements)
        obs.update(x)
        self.set_params(*obs.compute())

    def set_params(self, scale: torch.Tensor, zero: torch.Tensor):
        if isinstance(self.scale, nn.Parameter):
            del self.scale
            self.register_buffer("scale", None)  # back to a buffer (state_dict, .to(device))
        self.scale = scale.detach().clone()
        self.zero = zero.detach().clone()
        self.lsq = False

    def make_scale_trainable(self):
        """Turn the step size into a Parameter (LSQ)."""
        if self.spec.dynamic:
            raise RuntimeError("a dynamic quantizer has no step size to train (it is computed per input)")
        if not self.calibrated:
            raise RuntimeError("calibrate the quantizer before making its scale trainable")
        scale = self.scale
        del self.scale
        self.scale = nn.Parameter(scale.clone())
        self.lsq, self.ste = True, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if self.init_on_call:  # the reference's lazy init: this call's tensor alone sets the range
            obs = Observer(self.spec, max(self.max_elements, x.numel()))
            obs.update(x)
            self.set_params(*obs.compute())
            self.init_on_call = False
        if self.spec.dynamic:
            return fake_quant(x, self.spec, *dynamic_qparams(x, self.spec), ste=self.ste)
        if not self.calibrated:
            raise RuntimeError(f"quantizer ({self.extra_repr()}) is not calibrated: run the PTQ method's calibration first")
        scale = self.scale
        if self.lsq:  # LSQ: gradient of s scaled by 1 / sqrt(N_per_scale * Q_p)
            n = x.numel() / max(1, scale.numel())
            scale = grad_scale(scale, 1.0 / math.sqrt(n * max(1, self.spec.qmax)))
        return fake_quant(x, self.spec, scale, self.zero, ste=self.ste)


class QuantModule(nn.Module):
    """Base of every wrapper: on/off states for weight and activation quantization."""

    def __init__(self):
        super().__init__()
        self.w_on = False
        self.a_on = False

    @property
    def quantized(self) -> bool:
        return self.w_on or self.a_on

    def set_quant_state(self, weight: bool, act: bool):
        self.w_on, self.a_on = bool(weight), bool(act)

    def get_quant_state(self) -> tuple[bool, bool]:
        return self.w_on, self.a_on


class _QuantWeighted(QuantModule):
    """Shared logic of QuantLinear and QuantConv2d.

    weight / bias: the quantized path's (latent) parameters. fp_weight / fp_bias: the float
    path; the same tensors until ``detach_fp()``. w_codes: frozen integer grid values in the
    smallest integer dtype that holds them (set by ``freeze_weight_codes`` or a data-driven
    stage 1 such as GPTQ; then the quantized weight is (codes - zero) * scale). w_gidx: optional
    group index per input column (GPTQ's act-order groups are contiguous in the permuted order):
    then scale / zero are (out, groups) and column c uses group w_gidx[c].
    out_gamma / out_beta: an optional unfolded channel-wise affine on the output (QwT-v2).
    """

    out_channel_dim = -1  # where output channels live in the output tensor

    def _init_common(self, module, w_spec: QuantSpec | None, a_spec: QuantSpec | None, max_elements: int):
        self.weight = module.weight
        self.bias = module.bias
        self.register_buffer("fp_weight", None, persistent=False)
        self.register_buffer("fp_bias", None, persistent=False)
        self.register_buffer("w_codes", None)
        self.register_buffer("w_gidx", None)
        self.w_quant = Quantizer(w_spec, max_elements) if w_spec is not None else None
        self.in_quant = Quantizer(a_spec, max_elements) if a_spec is not None else None
        self.out_gamma = None
        self.out_beta = None
        self.added_bias = 0  # bias entries a compensation fold had to create (layer had none)

    def extra_param_count(self) -> int:
        n = self.added_bias
        if self.out_gamma is not None:
            n += self.out_gamma.numel() + self.out_beta.numel()
        return n

    def compensation_parameters(self):
        return [p for p in (self.out_gamma, self.out_beta) if p is not None]

    # -- float path -----------------------------------------------------------------------
    def float_weight(self):
        return self.weight if self.fp_weight is None else self.fp_weight

    def float_bias(self):
        if self.fp_weight is None:
            return self.bias
        return self.fp_bias

    def detach_fp(self):
        """Give the float path its own copy, so that the quantized path may change."""
        if self.fp_weight is None:
            self.fp_weight = self.weight.detach().clone()
            self.fp_bias = None if self.bias is None else self.bias.detach().clone()

    # -- quantized path -------------------------------------------------------------------
    def calibrate_weight(self):
        if self.w_quant is not None:
            self.w_quant.calibrate_from(self.weight.detach())
            self.w_codes = None
            self.w_gidx = None

    def freeze_weight_codes(self):
        """Store the integer grid values of the current weight (deployment form)."""
        if self.w_quant is None:
            raise ValueError(f"{type(self).__name__} has no weight quantizer to freeze")
        if self.w_gidx is not None:
            raise ValueError("weights with a per-column group index (GPTQ act-order groups) are frozen by the method that set them")
        q = self.w_quant
        codes = quantize_codes(self._grouped(self.weight.detach()), q.scale, q.zero, q.spec.qmin, q.spec.qmax)
        self.set_weight_codes(codes.reshape(self.weight.shape))

    def set_weight_codes(self, codes: torch.Tensor, gidx: torch.Tensor | None = None):
        """Store integer codes (any dtype holding integral values) in the smallest integer dtype."""
        spec = self.w_quant.spec
        dtype = torch.uint8 if 0 <= spec.qmin and spec.qmax <= 255 else torch.int8 if -128 <= spec.qmin and spec.qmax <= 127 else torch.int32
        self.w_codes = codes.detach().round().to(dtype)
        self.w_gidx = None if gidx is None else gidx.to(device=codes.device, dtype=torch.long)

    def _grouped(self, w):
        spec = self.w_quant.spec
        if spec.granularity == "group":
            return w.reshape(*w.shape[:-1], w.shape[-1] // spec.group_size, spec.group_size)
        return w

    def quant_weight(self):
        if self.w_quant is None:
            return self.weight
        q = self.w_quant
        if self.w_codes is not None:
            codes = self.w_codes.to(self.weight.dtype)
            if self.w_gidx is not None:
                scale = q.scale.reshape(q.scale.shape[0], -1)[:, self.w_gidx]
                zero = q.zero.reshape(q.zero.shape[0], -1)[:, self.w_gidx]
                return (codes - zero) * scale
            return ((self._grouped(codes) - q.zero) * q.scale).reshape(self.weight.shape)
        return q(self.weight)

    def per_channel_weight_scale(self) -> bool:
        q = self.w_quant
        return q is not None and q.spec.granularity == "channel" and q.spec.axis % self.weight.dim() == 0

    def forward(self, x):
        if not self.quantized:
            return self._op(x, self.float_weight(), self.float_bias())
        if self.a_on and self.in_quant is not None:
            x = self.in_quant(x)
        w = self.quant_weight() if self.w_on else self.weight
        y = self._op(x, w, self.bias)
        if self.out_gamma is not None:
            shape = [1] * y.dim()
            shape[self.out_channel_dim] = -1
            y = y * self.out_gamma.view(shape) + self.out_beta.view(shape)
        return y


class QuantLinear(_QuantWeighted):
    out_channel_dim = -1

    def __init__(self, module: nn.Linear, w_spec=None, a_spec=None, max_elements: int = 2**23):
        super().__init__()
        self.in_features, self.out_features = module.in_features, module.out_features
        self._init_common(module, w_spec, a_spec, max_elements)

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, w_on={self.w_on}, a_on={self.a_on}"


class QuantConv2d(_QuantWeighted):
    out_channel_dim = 1

    def __init__(self, module: nn.Conv2d, w_spec=None, a_spec=None, max_elements: int = 2**23):
        super().__init__()
        if module.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {module.padding_mode!r}")
        self.in_channels, self.out_channels = module.in_channels, module.out_channels
        self.kernel_size, self.stride, self.padding = module.kernel_size, module.stride, module.padding
        self.dilation, self.groups = module.dilation, module.groups
        self._init_common(module, w_spec, a_spec, max_elements)

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, w_on={self.w_on}, a_on={self.a_on}"


class QuantMatMul(QuantModule):
    """a @ b with both operands fake-quantized when activations are on."""

    def __init__(self, a_spec: QuantSpec | None, b_spec: QuantSpec | None, max_elements: int = 2**23):
        super().__init__()
        self.a_quant = Quantizer(a_spec, max_elements) if a_spec is not None else None
        self.b_quant = Quantizer(b_spec, max_elements) if b_spec is not None else None

    def forward(self, a, b):
        if self.a_on:
            if self.a_quant is not None:
                a = self.a_quant(a)
            if self.b_quant is not None:
                b = self.b_quant(b)
        return a @ b


def quant_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, QuantModule)]


def quantizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def _follows(m) -> bool:
    return isinstance(m, QuantModule) or getattr(m, "follows_quant_state", False)


def set_quant_state(model: nn.Module, weight: bool = True, act: bool = True) -> nn.Module:
    """Switch every wrapper (and every compensation module) of ``model`` on or off."""
    for m in model.modules():
        if _follows(m):
            m.set_quant_state(weight, act)
    return model


def get_quant_state(model: nn.Module) -> list:
    """The on/off state of every wrapper and compensation module (for ``restore_quant_state``)."""
    return [(m, m.get_quant_state()) for m in model.modules() if _follows(m)]


def restore_quant_state(saved: list) -> None:
    for m, state in saved:
        m.set_quant_state(*state)


class float_view:
    """Context: ``model`` computes its float path (every wrapper and compensation off); the previous
    per-module states come back on exit. The float path of a quantized model is the FP model (up to
    float rounding where a stage-1 method folded an exact identity, e.g. RepQ-ViT)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = get_quant_state(self.model)
        set_quant_state(self.model, False, False)
        return self.model

    def __exit__(self, *exc):
        restore_quant_state(self.saved)
        return False


class calibrate_on_first_call:
    """Context: every (static) activation quantizer of ``model`` takes its range from the first
    tensor it sees and quantizes it at once, so each quantizer is calibrated on the already
    quantized upstream (the official RepQ-ViT / QwT code's calibration forward)."""

    def __init__(self, model: nn.Module):
        self.qs = [q for m in quant_modules(model) for q in _act_quantizers(m) if not q.spec.dynamic]

    def __enter__(self):
        for q in self.qs:
            q.init_on_call = True
        return self

    def __exit__(self, *exc):
        for q in self.qs:
            q.init_on_call = False
        return False


class observe_activations:
    """Context: every activation quantizer of ``model`` records what passes; on exit computes ranges."""

    def __init__(self, model: nn.Module, only=None):
        self.qs = [q for m in quant_modules(model) for q in _act_quantizers(m)
                   if not q.spec.dynamic and (only is None or q in only)]

    def __enter__(self):
        for q in self.qs:
            q.start_observing()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            for q in self.qs:
                if q.observer is not None and q.observer.shape is not None:
                    q.finish_observing()
                else:
                    q.observer = None
        else:
            for q in self.qs:
                q.observer = None
        return False


def _act_quantizers(m):
    if isinstance(m, _QuantWeighted):
        return [m.in_quant] if m.in_quant is not None else []
    if isinstance(m, QuantMatMul):
        return [q for q in (m.a_quant, m.b_quant) if q is not None]
    return []
