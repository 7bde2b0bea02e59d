"""The block-wise view every calibration algorithm uses.

An adapter wraps one model instance and exposes
  stem(x) -> h              everything before the first compensated unit
  units()                   ordered Units; each names a block (the thing QwT compensates) and an
                            optional ``pre`` module run before it and not compensated
                            (Swin's PatchMerging)
  head(h) -> output         everything after the last unit
  pre_logits(h)             features just before the classifier (QwT*'s MSE target)
plus the facts PTQ methods need: which layers stay 8-bit, which LayerNorm feeds which Linear.
Adapters look modules up by name on every call, so replacing a unit (a compensated wrapper)
is just ``set_module``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Unit:
    name: str
    pre: str | None = None


class ModelAdapter:
    family = "base"
    unit_layout = "channels_last"  # unit inputs/outputs are (..., C); "nchw" for CNN blocks

    def __init__(self, model: nn.Module):
        self.model = model

    # -- to implement ---------------------------------------------------------------------
    def stem(self, x):
        raise NotImplementedError

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def head(self, h):
        raise NotImplementedError

    def pre_logits(self, h):
        raise NotImplementedError

    def classifier_names(self) -> list[str]:
        """Modules that form the classifier (trained by QwT*)."""
        raise NotImplementedError

    def eight_bit_layers(self) -> set[str]:
        return set()

    def ln_linear_pairs(self) -> list[tuple[str, list[str]]]:
        """(LayerNorm name, names of the Linears it feeds) for RepQ-ViT's reparameterization."""
        return []

    # -- shared ---------------------------------------------------------------------------
    def get(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def set_module(self, name: str, module: nn.Module):
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def run_unit(self, unit: Unit, h):
        return self.get(unit.name)(self.unit_input(unit, h))

    def unit_input(self, unit: Unit, h):
        """The tensor the unit's block itself receives (after ``pre``)."""
        return self.get(unit.pre)(h) if unit.pre is not None else h

    def forward(self, x):
        h = self.stem(x)
        for u in self.units():
            h = self.run_unit(u, h)
        return self.head(h)

    def clone(self) -> "ModelAdapter":
        return type(self)(copy.deepcopy(self.model))


ADAPTERS: list[tuple[type, type]] = []


def register_adapter(model_type: type):
    def deco(cls):
        ADAPTERS.append((model_type, cls))
        return cls

    return deco


def adapter_for(model: nn.Module) -> ModelAdapter:
    for model_type, cls in ADAPTERS:
        if isinstance(model, model_type):
            return cls(model)
    raise TypeError(f"no block adapter for {type(model).__name__}; add one in qwt/models/ with @register_adapter")
