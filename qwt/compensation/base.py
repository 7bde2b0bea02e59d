"""What every stage-2 method receives, and the accounting of what it adds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..engine import LayerwiseEngine
from ..models.base import ModelAdapter
from ..quant.modules import _QuantWeighted


@dataclass
class CompContext:
    """What a stage-2 method receives.

    adapter: the quantized model (changed in place). fp_adapter: the float model (the teacher of
    distillation losses): a separate FP model, or ``FloatView(adapter)`` (the same model's float
    path, no second copy). calib(n, transform, batch_size, shard) -> list of calibration batches in
    the form the adapter's stem consumes. train_batches(batch_size) -> iterable of (batch, target)
    over the training set (one epoch). supervised_loss(output, target): the task's training loss
    (QwT*). store: where the layer-wise engine keeps cached activations ("cpu" offloads).
    """

    adapter: ModelAdapter
    fp_adapter: ModelAdapter
    calib: Callable
    train_batches: Callable | None = None
    device: torch.device | str = "cpu"
    log: Callable = print
    supervised_loss: Callable | None = None
    store: str | None = None

    def calib_batches(self, cfg: dict) -> list:
        """The calibration batches a closed-form method fits on (this rank's share under torchrun)."""
        return self.calib(int(cfg["num_samples"]), cfg["calib_transform"], int(cfg["batch_size"]), shard=True)

    def engine(self, cfg: dict, kinds=("unit",), fp_chain: bool = False, desc: str | None = None) -> LayerwiseEngine:
        """A layer-wise walk of the quantized model over the method's calibration batches."""
        return LayerwiseEngine(self.adapter, self.calib_batches(cfg), kinds=kinds, fp_chain=fp_chain,
                               store=self.store, device=torch.device(self.device), desc=desc)


def extra_params(model: nn.Module) -> int:
    """Parameters a compensation added to the deployed model (0 for folded QwT-v2)."""
    total = 0
    for m in model.modules():
        if hasattr(m, "extra_param_count"):
            total += int(m.extra_param_count())
    return total


def model_size_mb(model: nn.Module) -> float:
    """Quantized weights at their bit-width, compensation weights at 16 bits, the rest at 32."""
    bits = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, _QuantWeighted) and m.w_quant is not None and m.w_on:
            bits += m.weight.numel() * m.w_quant.spec.bits
            seen.add(id(m.weight))
        if hasattr(m, "compensation_parameters"):
            for p in m.compensation_parameters():
                bits += p.numel() * 16
                seen.add(id(p))
    for p in model.parameters():
        if id(p) not in seen:
            bits += p.numel() * 32
    return bits / 8 / 2**20
