"""Stage-2 compensation methods, one file each, plus the streaming least-squares solver.

A *variant* is a chain of methods joined by '+', applied in order to a copy of the stage-1 model
and recorded under that name: "none", "qwt", "qwt_v2", "qft+qwt_v2", ...
"""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import CompContext, extra_params, model_size_mb

METHODS = ("qwt", "qwt_star", "qwt_v2", "qft")


def parse_steps(variant: str) -> list[tuple[str, str | None]]:
    """(method, settings profile) per step. A step ``method@profile`` runs ``method`` with its
    settings overlaid by ``compensation.<method>.profiles.<profile>`` (e.g. ``qwt@local``: QwT with
    the local target beside ``qwt`` with the default one, in one run)."""
    steps = [s.strip() for s in str(variant).split("+") if s.strip()]
    if not steps:
        raise ConfigError("empty compensation variant: use 'none' for the base model")
    if steps == ["none"]:
        return []
    out = []
    for s in steps:
        m, _, prof = s.partition("@")
        if m not in METHODS:
            raise ConfigError(f"unknown compensation {s!r} in variant {variant!r}: compensation.variants entries are 'none' or methods {METHODS} joined by '+' (e.g. qft+qwt_v2; method@profile for a settings profile)")
        out.append((m, prof or None))
    return out


def parse_variant(variant: str) -> list[str]:
    """The methods of ``variant`` in order (profiles stripped)."""
    return [m for m, _ in parse_steps(variant)]


def step_settings(settings: dict, method: str, profile: str | None) -> dict:
    """``settings[method]`` with the profile's overrides (``settings[method]['profiles'][profile]``)."""
    base = dict(settings[method])
    profiles = base.pop("profiles", None) or {}
    if profile is None:
        return base
    if profile not in profiles:
        raise ConfigError(f"compensation variant step {method}@{profile}: compensation.{method}.profiles has no {profile!r} "
                          f"(defined: {sorted(profiles) or 'none'})")
    base.update(profiles[profile])
    return base


def get_method(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def apply_variant(ctx: CompContext, variant: str, settings: dict) -> dict:
    """Apply each step of ``variant`` with its settings (``settings[method]``); returns info per step."""
    info = {}
    for method, profile in parse_steps(variant):
        key = method if profile is None else f"{method}@{profile}"
        info[key] = get_method(method).apply(ctx, step_settings(settings, method, profile))
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
