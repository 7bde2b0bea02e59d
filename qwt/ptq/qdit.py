"""Q-DiT's W4A8 baseline (the QwT authors' DiT code on top of Q-DiT): GPTQ weights (``gptq.py``, the
reference algorithm; no copy) with Q-DiT's settings, and dynamic activation quantizers.

  weights      GPTQ, asymmetric, groups of ``group_size`` (128) input columns, no act-order,
               dampening 0.01, every quantized Linear of a block fitted on one collection
               (``sequential: false``: the five Linears of a block together);
  activations  dynamic, asymmetric, per token in contiguous groups of ``act_group_size`` (128)
               channels, computed per forward (Q-DiT's rule, ``QuantSpec.dynamic``), at the inputs of
               the layers the adapter does not mark weight-only; they are on while GPTQ collects its
               inputs, so H comes from activation-quantized inputs (Q-DiT inserts them first);
  float        whatever the adapter keeps float (DiT: embedders, final layer, attention matmuls).
The calibration set is the task's ``sampling`` transform (points (x_t, t, y) of the FP model's own
DDIM trajectories at random steps).
"""
from __future__ import annotations

from . import gptq
from .common import MethodSpecs


def specs(w_bits: int, a_bits: int, group_size: int = 128, act_group_size: int = 128, damp: float = 0.01,
          act_order: bool = False, sym: bool = False, block_size: int = 128, **_) -> MethodSpecs:
    s = gptq.specs(w_bits, a_bits, keep_8bit=False, group_size=group_size, sym=sym, act_order=act_order,
                   static_groups=False, damp=damp, block_size=block_size, sequential=False,
                   act_quant="dynamic", act_group_size=act_group_size)
    s.options["method"] = "qdit"
    return s
