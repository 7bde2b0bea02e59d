"""Percentile: RepQ-ViT's uniform quantizer without reparameterization (QwT's ResNet baseline).

Weights per output channel, activations per tensor; every range from RepQ-ViT's percentile
search (p in {0.999, 0.9999, 0.99999}, lowest L2 error). First conv / patch embedding and the
classifier stay W8A8; BatchNorm is kept in float and not folded.
"""
from ..quant import QuantSpec
from .common import MethodSpecs


def specs(w_bits: int, a_bits: int, keep_8bit: bool = True, **_) -> MethodSpecs:
    act = QuantSpec(bits=a_bits, estimator="percentile_search")
    return MethodSpecs(
        weight=QuantSpec(bits=w_bits, granularity="channel", axis=0, estimator="percentile_search"),
        act=act, softmax=act, matmul=act, keep_8bit=keep_8bit,
    )
