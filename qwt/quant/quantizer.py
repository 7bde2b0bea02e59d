"""Quantizer math: immutable specs, uniform affine and log-sqrt2 fake quantization.

Everything here is plain tensor math; range estimation lives in ``observers.py`` and the
module wrappers in ``modules.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

GRANULARITIES = ("tensor", "channel", "group", "token")
SCHEMES = ("uniform", "log_sqrt2")
ESTIMATORS = ("minmax", "percentile_search", "mse", "hist_percentile")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. A small immutable value; use ``spec.with_(bits=6)``.

    granularity: "tensor" (one scale), "channel" (one scale per index of ``axis``),
    "group" (``group_size`` consecutive elements of the last dimension share a scale) or
    "token" (one scale per position of the leading dims, i.e. per row of the last dimension).
    estimator: the range rule used at calibration (see ``observers.py``).
    dynamic: the scale and zero-point are computed from each tensor as it passes (per forward), not
    calibrated: asymmetric, range [min, max] of each group (0 not forced into it),
    scale = max(max - min, 1e-5) / qmax, zero = clamp(round(-min / scale), 0, qmax) (Q-DiT's rule).
    Use with granularity "token" or "group" (activations).

    Numerics where the official RepQ-ViT code computes differently (``configs/numerics/``):
    quantile: "exact" (percentile positions ranked in float64, L2 score summed) or "torch"
    (``torch.quantile`` in float32 -- numpy's percentile above its 16M-element limit -- and the
    score as a mean, as the reference code). log_floor: the log-sqrt2 quantizer's input x / delta
    is clamped to at least this before the logarithm (reference: 1e-6; 0: x = 0 maps to 0).
    zero_in_range / clamp_zero: an asymmetric range is widened to include 0 / the zero-point is
    clamped to the code range (ours: both; the reference: neither).
    """

    bits: int = 8
    symmetric: bool = False
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 128
    scheme: str = "uniform"
    estimator: str = "minmax"
    percentile: float = 99.99
    dynamic: bool = False
    quantile: str = "exact"
    log_floor: float = 0.0
    zero_in_range: bool = True
    clamp_zero: bool = True

    def __post_init__(self):
        if not 1 <= int(self.bits) <= 16:
            raise ValueError(f"QuantSpec.bits must be in 1..16, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"QuantSpec.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"QuantSpec.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.scheme == "log_sqrt2" and self.granularity != "tensor":
            raise ValueError("the log-sqrt2 quantizer is per-tensor only (granularity='tensor')")
        if self.granularity == "group" and int(self.group_size) < 1:
            raise ValueError(f"QuantSpec.group_size must be >= 1, got {self.group_size}")
        if self.quantile not in ("exact", "torch"):
            raise ValueError(f"QuantSpec.quantile must be 'exact' or 'torch', got {self.quantile!r}")
        if self.dynamic and (self.symmetric or self.scheme != "uniform" or self.granularity not in ("token", "group", "tensor")):
            raise ValueError("dynamic quantization is uniform asymmetric with granularity 'token', 'group' or 'tensor'")

    def with_(self, **changes) -> "QuantSpec":
        return replace(self, **changes)

    @property
    def qmin(self) -> int:
        # symmetric grids are narrow-range (-(2^(b-1)-1) .. 2^(b-1)-1), as TensorRT's
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (identity backward)."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    y = x * factor
    return x.detach() + (y - y.detach())  # forward is exactly x (bit for bit)


# ---------------------------------------------------------------------------------------------
# shapes: every granularity is handled by viewing x as (..., reduce) where statistics are taken
# over the reduce dims, so one code path serves tensor / channel / group.


def to_stat_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape ``x`` so that the *last* dim holds the elements that share one scale.

    tensor  -> (1, numel)
    channel -> (C, numel / C)          channel index = ``spec.axis``
    group   -> (numel / g, g)          groups of the last dimension
    token   -> (numel / d, d)          d = size of the last dimension
    """
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "token":
        return x.reshape(-1, x.shape[-1])
    if spec.granularity == "channel":
        axis = spec.axis % x.dim()
        if axis == x.dim() - 1:  # channels last (activations): each row in the tensor's own element order
            return x.reshape(-1, x.shape[-1]).t().contiguous()
        return x.transpose(0, axis).reshape(x.shape[axis], -1)
    g = spec.group_size
    if x.shape[-1] % g:
        raise ValueError(f"per-group quantization needs the last dim ({x.shape[-1]}) divisible by group_size={g}")
    return x.reshape(-1, g)


def param_shape(x_shape: torch.Size, spec: QuantSpec) -> tuple[int, ...]:
    """Broadcastable shape of scale / zero-point for a tensor of ``x_shape``."""
    if spec.granularity == "tensor":
        return ()
    if spec.granularity == "channel":
        axis = spec.axis % len(x_shape)
        shape = [1] * len(x_shape)
        shape[axis] = x_shape[axis]
        return tuple(shape)
    if spec.granularity == "token":
        return tuple(x_shape[:-1]) + (1,)
    return tuple(x_shape[:-1]) + (x_shape[-1] // spec.group_size, 1)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, eps: float = 1e-8):
    """Scale and zero-point (both float tensors) of a uniform grid covering [lo, hi] (widened to
    include 0 unless ``spec.zero_in_range`` is off; symmetric grids always include 0)."""
    if spec.zero_in_range or spec.symmetric:
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (amax / spec.qmax).clamp_min(eps)
        zero = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(eps)
        zero = torch.round(-lo / scale)
        if spec.clamp_zero:
            zero = torch.clamp(zero, spec.qmin, spec.qmax)
    return scale, zero


def fake_quant_uniform(x, scale, zero, qmin: int, qmax: int, ste: bool = False):
    """x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s."""
    r = round_ste if ste else torch.round
    q = torch.clamp(r(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def quantize_codes(x, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """Integer grid values (as float tensor) of x."""
    return torch.clamp(torch.round(x / scale) + zero, qmin, qmax)


DYNAMIC_RANGE_EPS = 1e-5


def dynamic_qparams(x: torch.Tensor, spec: QuantSpec):
    """Per-forward scale and zero-point of ``x`` (shaped by ``param_shape``), Q-DiT's rule:
    scale = max(max - min, 1e-5) / qmax, zero = clamp(round(-min / scale), 0, qmax); the range is the
    group's own [min, max] (0 is not forced into it)."""
    with torch.no_grad():
        v = to_stat_view(x.detach(), spec)
        lo, hi = v.amin(-1), v.amax(-1)
        scale = (hi - lo).clamp_min(DYNAMIC_RANGE_EPS) / spec.qmax
        zero = torch.clamp(torch.round(-lo / scale), spec.qmin, spec.qmax)
        shape = param_shape(x.shape, spec)
        return scale.reshape(shape), zero.reshape(shape)


def fake_quant(x: torch.Tensor, spec: QuantSpec, scale, zero, ste: bool = False) -> torch.Tensor:
    """Fake-quantize ``x`` with parameters shaped by ``param_shape`` (group view handled here)."""
    if spec.scheme == "log_sqrt2":
        x_hat = fake_quant_log_sqrt2(x, scale, spec.bits, spec.log_floor)
        # ste: identity gradient to x (the codes are computed without gradient); delta keeps its own
        return x_hat + (x - x.detach()) if ste else x_hat
    if spec.granularity == "group":
        g = spec.group_size
        xv = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
        return fake_quant_uniform(xv, scale, zero, spec.qmin, spec.qmax, ste).reshape(x.shape)
    return fake_quant_uniform(x, scale, zero, spec.qmin, spec.qmax, ste)


def log_sqrt2_codes(x: torch.Tensor, delta, bits: int, floor: float = 0.0) -> torch.Tensor:
    """q = round(-2 log2(x / delta)); codes >= 2^b (incl. x = 0 without a floor) mean 'zero'.
    ``floor`` > 0: x / delta is clamped to at least ``floor`` first (the reference code: 1e-6)."""
    with torch.no_grad():
        if floor > 0:
            return torch.round(-1 * torch.log2(torch.clamp(x / delta, min=floor)) * 2)
        return torch.round(-2.0 * torch.log2(x.clamp_min(0) / delta))


def fake_quant_log_sqrt2(x: torch.Tensor, delta, bits: int, floor: float = 0.0) -> torch.Tensor:
    """RepQ-ViT's log-sqrt2 quantizer for post-softmax values in [0, 1].

    q = clamp(round(-2 log2(x/delta)), 0, 2^b - 1);  x_hat = delta * 2^(-ceil(q/2)) * sqrt2^(q mod 2);
    codes past the range (tiny x, and x = 0 unless a ``floor`` keeps it in range) dequantize to 0.
    """
    n_levels = 2**bits
    q = log_sqrt2_codes(x, delta, bits, floor)
    beyond = q >= n_levels
    q = q.clamp(0, n_levels - 1)
    odd = torch.remainder(q, 2)
    x_hat = delta * torch.pow(2.0, -torch.ceil(q / 2)) * (1 + odd * (math.sqrt(2) - 1))
    return torch.where(beyond, torch.zeros_like(x_hat), x_hat).to(x.dtype)
