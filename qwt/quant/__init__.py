"""Quantization core: specs and math (quantizer), range estimators (observers), wrappers (modules),
registry-based patching (patch)."""
from .modules import (QuantConv2d, QuantLinear, QuantMatMul, QuantModule, Quantizer, observe_activations,
                      quant_modules, quantizers, set_quant_state)
from .patch import LayerQuant, quantize_model, register_patcher
from .quantizer import QuantSpec, fake_quant, fake_quant_log_sqrt2, fake_quant_uniform, qparams_from_range
