"""RTN / MinMax: uniform asymmetric, weights per output channel, activations per tensor,
ranges = min/max over the calibration data. Attention probabilities use the same uniform grid."""
from ..quant import QuantSpec
from .common import MethodSpecs


def specs(w_bits: int, a_bits: int, keep_8bit: bool = True, **_) -> MethodSpecs:
    act = QuantSpec(bits=a_bits, estimator="minmax")
    return MethodSpecs(
        weight=QuantSpec(bits=w_bits, granularity="channel", axis=0, estimator="minmax"),
        act=act, softmax=act, matmul=act, keep_8bit=keep_8bit,
    )
