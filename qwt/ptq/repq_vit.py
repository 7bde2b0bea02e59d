"""RepQ-ViT (ICCV 2023), the ViT / Swin baseline of QwT.

- Uniform asymmetric quantizers with the percentile search (p in {0.999, 0.9999, 0.99999}).
  Weights per output channel, activations per tensor.
- Inputs of Linears fed by a norm (qkv, fc1, Swin's reduction; LayerNorm or RMSNorm) are first calibrated per
  channel (delta_c, z_c), then reparameterized to one per-tensor quantizer:
    delta~ = mean delta_c, z~ = mean z_c (kept as a float, as the official code; ``numerics.reparam_zero=round``
    rounds it to an integer), r_c = delta_c / delta~,
    beta_c = min_c / r_c - min~   (min_c = -z_c delta_c, min~ = -z~ delta~)
  folded into the LayerNorm (gamma_c <- gamma_c / r_c, b_c <- b_c / r_c - beta_c) and into the
  next Linear (W[:, c] <- W[:, c] r_c, bias <- bias + W (r * beta)), then weight scales are
  re-calibrated. In float this is an exact identity (tests/test_repq_vit.py). A norm without a
  bias (RMSNorm) gets one for the shift (``NormWithBias``, counted as extra parameters).
- Post-softmax attention probabilities: log-sqrt2 quantizer; q, k, v: per-tensor uniform.
- Edge layers (``numerics.edge_layers``): "reference" = the official code's rule (every Conv2d,
  i.e. the patch embedding, has an 8-bit input quantizer and run-bits weights; every Linear, the
  classifier included, is at the run's bits); "w8a8" = patch embedding and classifier at W8A8.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..quant import QuantSpec
from ..quant.modules import Quantizer
from .common import MethodSpecs


def specs(w_bits: int, a_bits: int, keep_8bit: bool = True, **_) -> MethodSpecs:
    act = QuantSpec(bits=a_bits, estimator="percentile_search")
    return MethodSpecs(
        weight=QuantSpec(bits=w_bits, granularity="channel", axis=0, estimator="percentile_search"),
        act=act,
        softmax=QuantSpec(bits=a_bits, scheme="log_sqrt2", estimator="percentile_search"),
        matmul=act,
        keep_8bit=keep_8bit,
        post_ln_act=act.with_(granularity="channel", axis=-1),
        post_calibration=reparameterize,
        options={"reference_edge_rule": "repq_vit"},
    )


@torch.no_grad()
def reparameterize(adapter, specs: MethodSpecs):
    for ln_name, lin_names in adapter.norm_linear_pairs():
        lins = [adapter.get(n) for n in lin_names]
        if lins[0].in_quant is None or lins[0].in_quant.spec.granularity != "channel":
            continue  # not calibrated per channel (e.g. weight-only): nothing to reparameterize
        q = lins[0].in_quant
        delta, zero = q.scale.flatten(), q.zero.flatten()
        d_t = delta.mean()
        z_t = zero.mean()
        if specs.options.get("reparam_zero", "float") == "round":  # ours: keep an integer zero-point
            z_t = torch.round(z_t)
        r = delta / d_t
        beta = (-zero * delta) / r - (-z_t * d_t)
        fold_channel_affine(adapter, ln_name, lins, r, beta, bias_order=specs.options.get("reparam_bias", "ours"))
        for lin in lins:
            per_tensor = Quantizer(specs.act, q.max_elements)
            per_tensor.set_params(d_t.reshape(()), z_t.reshape(()))
            lin.in_quant = per_tensor
            lin.calibrate_weight()


class NormWithBias(nn.Module):
    """A norm without a bias (RMSNorm) followed by a per-channel bias, so that RepQ-ViT's shift can
    be folded into it. The bias is a parameter the fold added (counted as extra parameters)."""

    adds_bias = True

    def __init__(self, norm: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.bias = nn.Parameter(bias)

    def forward(self, x):
        return self.norm(x) + self.bias

    def extra_param_count(self) -> int:
        return self.bias.numel()


@torch.no_grad()
def fold_channel_affine(adapter, norm_name: str, lins, r: torch.Tensor, beta: torch.Tensor, bias_order: str = "ours"):
    """Norm output y -> y / r - beta; each following Linear absorbs the inverse (exact in float).
    A norm without a bias (RMSNorm) gets one (``NormWithBias``). bias_order: "ours" adds
    W (r * beta) with the unscaled W; "reference" scales W by r first and adds (W r) beta."""
    norm = adapter.get(norm_name)
    if isinstance(norm, NormWithBias):
        weight, bias_owner = norm.norm.weight, norm
    else:
        weight, bias_owner = getattr(norm, "weight", None), norm
    if weight is None:
        raise ValueError(f"RepQ-ViT reparameterization needs an affine norm ('{norm_name}' has no weight)")
    for lin in lins:
        w = lin.weight
        if bias_order == "reference":
            w.mul_(r[None, :])
            extra = torch.mm(w, beta.reshape(-1, 1)).reshape(-1)
        else:
            extra = w @ (r * beta)
            w.mul_(r[None, :])
        if lin.bias is None:
            lin.bias = nn.Parameter(extra.clone())
        else:
            lin.bias.add_(extra)
    weight.div_(r)
    if getattr(bias_owner, "bias", None) is None:
        adapter.set_module(norm_name, NormWithBias(norm, -beta.to(weight.dtype)))
    else:
        bias_owner.bias.div_(r).sub_(beta)
