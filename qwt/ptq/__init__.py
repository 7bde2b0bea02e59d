"""Stage-1 PTQ methods, selected by ``ptq=<name>``. Each module exposes
``specs(w_bits, a_bits, **options) -> MethodSpecs``; ``a_bits >= 16`` means float activations
(weight-only quantization: no activation quantizer at all)."""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .common import FLOAT_ACT_BITS, NUMERICS_DEFAULT, MethodSpecs, apply_ptq

PTQ_METHODS = ("rtn", "percentile", "repq_vit", "hist_w8a8", "gptq", "qdit")


def get_specs(name: str, w_bits: int, a_bits: int, numerics: dict | None = None, **options) -> MethodSpecs:
    """The method's specs at these bits; ``numerics``: a profile of ``configs/numerics/`` (None: the
    default profile, ``NUMERICS_DEFAULT``)."""
    if name not in PTQ_METHODS:
        raise ConfigError(f"unknown ptq method {name!r}: set ptq= one of {sorted(PTQ_METHODS)} (or ptq=fp for no quantization)")
    weight_only = int(a_bits) >= FLOAT_ACT_BITS
    # weight-only: the method builds its activation specs at a placeholder width; they are dropped
    specs = importlib.import_module(f"{__name__}.{name}").specs(int(w_bits), 8 if weight_only else int(a_bits), **options)
    specs.with_numerics(NUMERICS_DEFAULT if numerics is None else numerics)
    return specs.weight_only() if weight_only else specs
