"""Stage-2 compensation methods, one file each, plus the streaming least-squares solver.

A *variant* is a chain of methods joined by '+', applied in order to a copy of the stage-1 model
and recorded under that name: "none", "qwt", "qwt_v2", "qft+qwt_v2", ...
"""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import CompContext, extra_params, model_size_mb

METHODS = ("qwt", "qwt_star", "qwt_v2", "qft")


def parse_variant(variant: str) -> list[str]:
    steps = [s.strip() for s in str(variant).split("+") if s.strip()]
    if not steps:
        raise ConfigError("empty compensation variant: use 'none' for the base model")
    if steps == ["none"]:
        return []
    for s in steps:
        if s not in METHODS:
            raise ConfigError(f"unknown compensation {s!r} in variant {variant!r}: compensation.variants entries are 'none' or methods {METHODS} joined by '+' (e.g. qft+qwt_v2)")
    return steps


def get_method(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def apply_variant(ctx: CompContext, variant: str, settings: dict) -> dict:
    """Apply each step of ``variant`` with its settings (``settings[method]``); returns info per step."""
    info = {}
    for step in parse_variant(variant):
        info[step] = get_method(step).apply(ctx, dict(settings[step]))
    return info


def method_settings(numerics: str | dict = "default") -> dict:
    """Every stage-2 method's settings as ``configs/compensation/_methods.yaml`` gives them, resolved
    with a numerics profile (a name under ``configs/numerics/`` or a dict): for use without Hydra."""
    from pathlib import Path

    from omegaconf import OmegaConf

    configs = Path(__file__).resolve().parents[2] / "configs"
    prof = OmegaConf.load(configs / "numerics" / f"{numerics}.yaml") if isinstance(numerics, str) else OmegaConf.create(numerics)
    root = OmegaConf.create({"numerics": prof, "compensation": OmegaConf.load(configs / "compensation" / "_methods.yaml")})
    return OmegaConf.to_container(root, resolve=True)["compensation"]
