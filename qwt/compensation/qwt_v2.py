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
gets one; counted as extra parameters). A layer without per-channel weight scales cannot take the
fold: that is an error unless ``unfoldable: keep_unfolded`` asks to keep those as modules.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import dist

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


def execution_order(adapter, batch) -> list[str]:
    names = {m: n for n, m in adapter.model.named_modules() if isinstance(m, _QuantWeighted)}
    order, hooks = [], []
    for m in names:
        hooks.append(m.register_forward_hook(lambda mod, i, o: order.append(names[mod]) if names[mod] not in order else None))
    try:
        adapter.forward(batch)
    finally:
        for h in hooks:
            h.remove()
    return order


def _segments(adapter, order):
    """[(run(h) -> h', [layer names])] for stem, every unit, head."""
    units = adapter.units()

    def owner(name):
        for i, u in enumerate(units):
            for prefix in (u.name, u.pre):
                if prefix and (name == prefix or name.startswith(prefix + ".")):
                    return i
        return None

    stem_layers, head_layers, unit_layers = [], [], [[] for _ in units]
    seen_unit = False
    for n in order:
        i = owner(n)
        if i is None:
            (head_layers if seen_unit else stem_layers).append(n)
        else:
            seen_unit = True
            unit_layers[i].append(n)
    segs = [(adapter.stem, stem_layers)]
    segs += [((lambda h, u=u: adapter.run_unit(u, h)), unit_layers[i]) for i, u in enumerate(units)]
    segs.append((adapter.head, head_layers))
    return segs


@torch.no_grad()
def fit_layer(layer: _QuantWeighted, run_segment, inputs, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    stats = None

    def hook(mod, args, out):
        nonlocal stats
        x = args[0]
        y = mod._op(x, mod.float_weight(), mod.float_bias())  # the float layer on the same input
        if stats is None:
            stats = ChannelStats(out.shape[mod.out_channel_dim], out.device)
        stats.update(out, y, mod.out_channel_dim)
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        for h in inputs:
            try:
                run_segment(h)
            except _StopForward:
                pass
    finally:
        handle.remove()

    dist.all_reduce_sum(stats.s)
    return stats.gain_offset(float(cfg.get("var_eps", 1e-8)), float(cfg.get("shrinkage", 0.0)))


@torch.no_grad()
def fold_affine(layer: _QuantWeighted, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Absorb y -> gamma * y + beta into the weight scale and bias (exact)."""
    if not layer.per_channel_weight_scale():
        raise ValueError("cannot fold: the layer has no per-channel weight scale")
    layer.detach_fp()
    if layer.w_codes is None:  # already frozen (an earlier fold): keep the codes, the scale carries the fold
        layer.freeze_weight_codes()
    q = layer.w_quant
    shape = [-1] + [1] * (layer.weight.dim() - 1)
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
    batches = ctx.calib_images(cfg)
    set_quant_state(model, True, True)
    order = execution_order(adapter, batches[0])
    fold, unfoldable = bool(cfg.get("fold", True)), cfg.get("unfoldable", "error")
    if unfoldable not in ("error", "keep_unfolded"):
        raise ValueError(f"compensation.qwt_v2.unfoldable={unfoldable!r}: use 'error' or 'keep_unfolded'")
    if fold and unfoldable == "error":
        bad = [n for n in order if not adapter.get(n).per_channel_weight_scale()]
        if bad:
            raise ValueError(
                f"QwT-v2 fold=true needs per-channel weight scales, but {len(bad)} layers (e.g. {bad[0]}) have none "
                "(e.g. ptq=hist_w8a8 is per-tensor). Set compensation.qwt_v2.fold=false, or "
                "compensation.qwt_v2.unfoldable=keep_unfolded to fold only where possible."
            )
    inputs = batches
    folded = kept = 0
    for run_segment, layers in tqdm(_segments(adapter, order), desc="qwt_v2 segments", disable=not dist.is_main(), leave=False):
        for name in layers:
            layer = adapter.get(name)
            gamma, beta = fit_layer(layer, run_segment, inputs, cfg)
            dtype = layer.weight.dtype
            if fold and layer.per_channel_weight_scale():
                fold_affine(layer, gamma, beta)
                folded += 1
            else:
                layer.out_gamma = nn.Parameter(gamma.to(dtype))
                layer.out_beta = nn.Parameter(beta.to(dtype))
                kept += 1
        inputs = [run_segment(h) for h in inputs]
    return {"layers_folded": folded, "layers_unfolded": kept}


@torch.no_grad()
def fold_all(model: nn.Module) -> int:
    """Fold every unfolded affine that can be folded (deployment step for fold=false models)."""
    n = 0
    for m in model.modules():
        if isinstance(m, _QuantWeighted) and m.out_gamma is not None and m.per_channel_weight_scale():
            g, b = m.out_gamma.detach(), m.out_beta.detach()
            m.out_gamma = m.out_beta = None
            fold_affine(m, g, b)
            n += 1
    return n
