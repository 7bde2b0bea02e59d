"""Histogram-percentile (QwT's W8A8 latency table): symmetric per-tensor quantization of weights
and activations, amax = 99.99th percentile of |x| read off a histogram; both operands of both
attention matmuls are quantized. The bit-widths come from ``bits`` (the table is W8A8)."""
from ..quant import QuantSpec
from .common import MethodSpecs


def specs(w_bits: int, a_bits: int, keep_8bit: bool = True, percentile: float = 99.99, **_) -> MethodSpecs:
    act = QuantSpec(bits=a_bits, symmetric=True, estimator="hist_percentile", percentile=percentile)
    return MethodSpecs(
        weight=QuantSpec(bits=w_bits, symmetric=True, estimator="hist_percentile", percentile=percentile),
        act=act, softmax=act, matmul=act, keep_8bit=keep_8bit,
    )
