"""Stage-1 PTQ methods, selected by ``ptq=<name>``. Each module exposes ``specs(w_bits, a_bits, **options)``."""
from __future__ import annotations

from . import hist_w8a8, percentile, repq_vit, rtn
from ..errors import ConfigError
from .common import MethodSpecs, apply_ptq

PTQ_METHODS = {"rtn": rtn, "percentile": percentile, "repq_vit": repq_vit, "hist_w8a8": hist_w8a8}


def get_specs(name: str, w_bits: int, a_bits: int, **options) -> MethodSpecs:
    if name not in PTQ_METHODS:
        raise ConfigError(f"unknown ptq method {name!r}: set ptq= one of {sorted(PTQ_METHODS)} (or ptq=fp for no quantization)")
    return PTQ_METHODS[name].specs(w_bits, a_bits, **options)
