"""Model patching by module replacement through a registry (float type -> quant wrapper).

A PTQ method describes what to quantize with a *plan*: a function ``plan(name, module)`` that
returns a ``LayerQuant`` (or None to leave the module alone). ``quantize_model`` walks the model
once and replaces every planned module with its registered wrapper. A planned module whose type
has no registered patcher is an error, never silently skipped.

Linear and Conv2d are registered here. Library-specific types (timm attention, ...) come with
their family's adapter (``ModelAdapter.patchers()``), so this module imports no model library.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .modules import QuantConv2d, QuantLinear, QuantModule
from .quantizer import QuantSpec


@dataclass(frozen=True)
class LayerQuant:
    """What one module gets. For Linear/Conv2d: ``weight`` and ``act`` (its input). For attention:
    ``qk`` = specs of (q, k^T) operands of q @ k^T, ``pv`` = specs of (attn, v) of attn @ v;
    ``scale_after``: the attention scale multiplies q @ k^T (the reference code) instead of q."""

    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    qk: tuple[QuantSpec | None, QuantSpec | None] | None = None
    pv: tuple[QuantSpec | None, QuantSpec | None] | None = None
    scale_after: bool = False


PATCHERS: dict[type, Callable[[nn.Module, LayerQuant, int], nn.Module]] = {}


def register_patcher(float_type: type):
    """Register ``fn(module, layer_quant, max_elements) -> replacement`` for ``float_type``."""

    def deco(fn):
        PATCHERS[float_type] = fn
        return fn

    return deco


@register_patcher(nn.Linear)
def _patch_linear(m, lq: LayerQuant, max_elements):
    return QuantLinear(m, lq.weight, lq.act, max_elements)


@register_patcher(nn.Conv2d)
def _patch_conv(m, lq: LayerQuant, max_elements):
    return QuantConv2d(m, lq.weight, lq.act, max_elements)


def _set_submodule(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, plan: Callable[[str, nn.Module], LayerQuant | None], max_elements: int = 2**23,
                   patchers: dict | None = None) -> dict[str, str]:
    """Replace every module the plan names by its quant wrapper (in place). ``patchers`` adds
    wrappers for library types (an adapter's). Returns {name: wrapper type}."""
    table = {**PATCHERS, **(patchers or {})}
    patched = {}
    for name, module in list(model.named_modules()):
        lq = plan(name, module)
        if lq is None:
            continue
        if isinstance(module, QuantModule):
            raise TypeError(f"module '{name}' is already quantized ({type(module).__name__}): quantize a fresh float model")
        patcher = None
        for t in type(module).__mro__:
            if t in table:
                patcher = table[t]
                break
        if patcher is None:
            raise TypeError(
                f"cannot quantize module '{name}' of type {type(module).__name__}: no wrapper is registered for it. "
                f"Register one with qwt.quant.patch.register_patcher({type(module).__name__}), or change the PTQ plan to skip it."
            )
        new = patcher(module, lq, max_elements)
        if new is not module:
            _set_submodule(model, name, new)
        patched[name] = type(new).__name__
    return patched
