"""Shared (per test session) stage-1 results on the embedded ViT, so test files that need the
same W4A4 model do not calibrate it twice. Not a test module (no ``test_`` prefix)."""
from __future__ import annotations

import torch

from qwt.models import adapter_for
from qwt.ptq import apply_ptq, get_specs
from qwt.tasks.classification import calibration_batches, evaluate

SEED = 0  # configs/config.yaml
_CACHE: dict = {}


def calib_fn(data):
    def calib(n, transform, batch_size, shard=False):
        return [x for x, _ in calibration_batches(data, n, transform, batch_size, SEED, "cpu", shard=shard)]

    return calib


def top1(model, data) -> float:
    """Top-1 on a fixed fifth of the eval images (1,000: enough for the coarse checks made with it)."""
    from torch.utils.data import Subset

    sub = type(data)(data.train, data.train_eval_tf, Subset(data.val, range(0, len(data.val), 5)), data.name)
    return evaluate(model, sub, 500, "cpu")[0]["top1"]


def fp_top1(embedded_vit) -> float:
    model, data = embedded_vit
    if "fp" not in _CACHE:
        _CACHE["fp"] = top1(model, data)
    return _CACHE["fp"]


def quantized(embedded_vit, method: str, w_bits: int = 4, a_bits: int = 4):
    """(adapter of a quantized copy, its top-1). Stage-1 settings of configs/ptq/<method>.yaml:
    32 training-transform images in one batch. Callers must clone the adapter before changing it."""
    key = (method, w_bits, a_bits)
    if key not in _CACHE:
        model, data = embedded_vit
        adapter = adapter_for(model).clone()
        batches = calib_fn(data)(32, "train", 32)
        with torch.no_grad():
            apply_ptq(adapter, get_specs(method, w_bits, a_bits), batches)
        _CACHE[key] = (adapter, top1(adapter.model, data))
    return _CACHE[key]
