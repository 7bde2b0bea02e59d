"""QwT-v2 / CWAC: channel-wise affine post-compensation after every quantized Linear / Conv.

For each quantized layer L and output channel j, on the same input x (the quantized path's own
input, with every earlier layer already compensated):
    y = L_fp(x),  y_hat = L_q(x),   gamma_j = Cov(y_hat_j, y_j) / Var(y_hat_j),
    beta_j = mean(y_j) - gamma_j mean(y_hat_j)
Channels whose Var(y_hat_j) is tiny (relative ``var_eps``) keep gamma_j = 1 and only get the
offset. ``shrinkage`` s pulls gamma toward 1: gamma <- (1 - s) gamma + s.

Layers are fitted in execution order, segment by segment (stem, each unit, head); inside a segment
each layer's statistics come from re-running the segment on the cached segment inputs up to
that layer (the forward stops there), so every layer sees its compensated upstream.

fold=true (default): with per-channel weight scale s_j and bias b_j the affine is absorbed:
    codes frozen, s_j <- gamma_j s_j,  b_j <- gamma_j b_j + beta_j
so the deployed model has no extra parameters and no extra operations (a layer without a bias
gets one; counted as extra parameters). Group-wise scales fold row by row. A per-tensor weight
scale (ptq=hist_w8a8) becomes per-channel by the fold (``unfoldable: make_per_channel``, the
default; integer engines take per-channel weight scales at no cost; the row lists those layers);
``unfoldable: error`` refuses, ``keep_unfolded`` keeps their affine as a module.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import dist
from ..engine import capture_outputs
from ..errors import ConfigError
from ..quant import set_quant_state
from ..quant.modules import _QuantWeighted
from .base import CompContext


class _StopForward(Exception):
    pass


class ChannelStats:
    """Per-channel sums of y_hat, y, y_hat^2, y_hat*y over rows (float64)."""

    def __init__(self, channels: int, device):
        self.s = torch.zeros(5, channels, dtype=torch.float64, device=device)  # n, sum yh, sum y, sum yh^2, sum yh*y

    def update(self, yh: torch.Tensor, y: torch.Tensor, channel_dim: int):
        yh = yh.movedim(channel_dim, -1).reshape(-1, yh.shape[channel_dim]).double()
        y = y.movedim(channel_dim, -1).reshape(-1, y.shape[channel_dim]).double()
        self.s[0] += yh.shape[0]
        self.s[1] += yh.sum(0)
        self.s[2] += y.sum(0)
        self.s[3] += (yh * yh).sum(0)
        self.s[4] += (yh * y).sum(0)

    def gain_offset(self, var_eps: float = 1e-8, shrinkage: float = 0.0):
        n, syh, sy, syh2, syhy = self.s
        m_yh, m_y = syh / n, sy / n
        var = syh2 / n - m_yh**2
        cov = syhy / n - m_yh * m_y
        tiny = var <= var_eps * (syh2 / n).clamp_min(1e-30)
        gamma = torch.where(tiny, torch.ones_like(var), cov / torch.where(tiny, torch.ones_like(var), var))
        gamma = (1 - shrinkage) * gamma + shrinkage
        beta = m_y - gamma * m_yh
        return gamma, beta


@torch.no_grad()
def fit_layer(layer: _QuantWeighted, seg, cfg, fp_outputs: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel gain / offset of ``layer`` from every calibration batch of segment ``seg``.
    ``fp_outputs``: the global target (per batch, the FP chain's output of this layer)."""
    stats = None
    batch = {"i": 0}

    def hook(mod, args, out):
        nonlocal stats
        if fp_outputs is None:
            y = mod._op(args[0], mod.float_weight(), mod.float_bias())  # the float layer on the same input
        else:
            y = fp_outputs[batch["i"]].to(out.device)
        if stats is None:
            stats = ChannelStats(out.shape[mod.out_channel_dim], out.device)
        stats.update(out, y, mod.out_channel_dim)
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        for i, inp in enumerate(seg.inputs()):
            batch["i"] = i
            try:
                seg.run(inp)
            except _StopForward:
                pass
    finally:
        handle.remove()

    dist.all_reduce_sum(stats.s)
    return stats.gain_offset(float(cfg.get("var_eps", 1e-8)), float(cfg.get("shrinkage", 0.0)))


@torch.no_grad()
def fp_layer_outputs(seg, layers, store) -> dict:
    """{layer name: [the FP chain's output of that layer, per batch]} (one float run of the segment)."""
    out = {n: [] for n, _ in layers}
    mods = dict(layers)
    for inp in seg.fp_inputs():
        got = capture_outputs(mods, lambda: seg.run_float(inp))
        for n in out:
            out[n].append(got[n] if store is None else got[n].to(store))
    return out


def fold_kind(layer: _QuantWeighted) -> str:
    """"direct": the weight scale already has one value (or one row of group values) per output
    channel; "per_tensor": one scale for the whole weight (the fold makes it per channel);
    "none": no weight quantizer."""
    q = layer.w_quant
    if q is None:
        return "none"
    if layer.per_channel_weight_scale() or q.spec.granularity == "group":
        return "direct"
    return "per_tensor" if q.spec.granularity == "tensor" else "none"


@torch.no_grad()
def fold_affine(layer: _QuantWeighted, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Absorb y -> gamma * y + beta into the weight scale and bias (exact): codes frozen, each output
    channel's scale (or row of group scales) times gamma_j, bias_j <- gamma_j bias_j + beta_j. A
    per-tensor weight scale becomes a per-channel one (integer engines take per-channel weight
    scales at no cost)."""
    kind = fold_kind(layer)
    if kind == "none":
        raise ValueError("cannot fold: the layer has no per-channel, per-group or per-tensor weight scale")
    layer.detach_fp()
    if layer.w_codes is None:  # already frozen (an earlier fold): keep the codes, the scale carries the fold
        layer.freeze_weight_codes()
    q = layer.w_quant
    shape = [-1] + [1] * (q.scale.dim() - 1 if q.scale.dim() > 1 else layer.weight.dim() - 1)
    if kind == "per_tensor":
        out = layer.weight.shape[0]
        ch_shape = [out] + [1] * (layer.weight.dim() - 1)
        q.spec = q.spec.with_(granularity="channel", axis=0)
        q.set_params(q.scale.reshape(()).expand(ch_shape).clone(), q.zero.reshape(()).expand(ch_shape).clone())
        layer.scale_made_per_channel = True
        shape = ch_shape[:1] + [1] * (len(ch_shape) - 1)
    q.scale = q.scale * gamma.to(q.scale.dtype).view(shape)
    if layer.bias is None:
        layer.bias = nn.Parameter(beta.to(layer.weight.dtype).clone())
        layer.added_bias = beta.numel()
    else:
        layer.bias = nn.Parameter(gamma.to(layer.bias.dtype) * layer.bias.detach() + beta.to(layer.bias.dtype))


@torch.no_grad()
def apply(ctx: CompContext, cfg: dict) -> dict:
    adapter = ctx.adapter
    model = adapter.model
    set_quant_state(model, True, True)
    target = cfg.get("target", "local")
    if target not in ("local", "global"):
        raise ConfigError(f"compensation.qwt_v2.target={target!r}: use 'global' (the FP model's output of each layer) or 'local'")
    fold, unfoldable = bool(cfg.get("fold", True)), cfg.get("unfoldable", "make_per_channel")
    if unfoldable not in ("make_per_channel", "error", "keep_unfolded"):
        raise ConfigError(f"compensation.qwt_v2.unfoldable={unfoldable!r}: use make_per_channel, error or keep_unfolded")
    kinds = {n: fold_kind(m) for n, m in model.named_modules() if isinstance(m, _QuantWeighted)}
    if fold and unfoldable == "error":
        bad = [n for n, k in kinds.items() if k != "direct"]
        if bad:
            raise ConfigError(
                f"QwT-v2 fold=true with compensation.qwt_v2.unfoldable=error needs per-channel weight scales, but "
                f"{len(bad)} layers (e.g. {bad[0]}) have a per-tensor one (e.g. ptq=hist_w8a8). Use "
                "unfoldable=make_per_channel (the fold turns their scale per-channel), keep_unfolded, or fold=false."
            )
    can_fold = {"direct"} | ({"per_tensor"} if unfoldable == "make_per_channel" else set())
    folded = kept = 0
    made_per_channel = []
    store = None if ctx.store is None else torch.device(ctx.store)
    for seg in ctx.engine(cfg, kinds=("stem", "unit", "head"), fp_chain=target == "global", desc="qwt_v2 segments"):
        layers = seg.layers()
        fp_out = fp_layer_outputs(seg, layers, store) if target == "global" and layers else None
        for name, layer in layers:
            gamma, beta = fit_layer(layer, seg, cfg, None if fp_out is None else fp_out.pop(name))
            dtype = layer.weight.dtype
            if fold and kinds.get(name) in can_fold:
                if kinds[name] == "per_tensor":
                    made_per_channel.append(name)
                fold_affine(layer, gamma, beta)
                folded += 1
            else:
                layer.out_gamma = nn.Parameter(gamma.to(dtype))
                layer.out_beta = nn.Parameter(beta.to(dtype))
                kept += 1
    info = {"layers_folded": folded, "layers_unfolded": kept, "target": target}
    if made_per_channel:  # these layers' weight scale became per-channel (recorded in the row)
        info["weight_scale_made_per_channel"] = made_per_channel
    return info


@torch.no_grad()
def fold_all(model: nn.Module) -> int:
    """Fold every unfolded affine that can be folded (deployment step for fold=false models)."""
    n = 0
    for m in model.modules():
        if isinstance(m, _QuantWeighted) and m.out_gamma is not None and fold_kind(m) == "direct":
            g, b = m.out_gamma.detach(), m.out_beta.detach()
            m.out_gamma = m.out_beta = None
            fold_affine(m, g, b)
            n += 1
    return n
