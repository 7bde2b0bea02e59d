"""GPTQ (Frantar et al., ICLR 2023) as a data-driven stage-1 method, as in the reference code
(IST-DASLab ``gptq.py`` / ``quant.py``, vendored by the QwT LLaMA code and by Q-DiT).

Per layer, from its calibration inputs x (rows of the layer's input; Conv2d inputs unfolded):
  H = running mean over calls of (2 / n) x^T x (n counts the leading dim of each call), float32.
  Dead inputs (diag H = 0): H[d, d] = 1, W[:, d] = 0 (per-channel quantizer parameters are taken
  from W before that). Damping ``damp`` x mean(diag H). Hinv = upper Cholesky factor of H^-1.
  Columns in lazy blocks of ``block_size``: each column is quantized, its error divided by
  Hinv[i, i] and spread over the remaining columns of the block with Hinv's row; at a block's end
  the accumulated errors update every later column at once.
  act_order: columns processed by decreasing diag H (after the dead fix, before damping).
  Groups (``group_size`` > 0): "dynamic" groups are contiguous in processing order and take their
  parameters from W as updated at the last block end; ``static_groups`` take them from the
  un-updated W in original column order before the walk.
Quantizer (GPTQ's): the range always includes 0; asymmetric scale = (max - min) / maxq,
zero = round(-min / scale); symmetric: max = max(|min|, max), min = -max (if min < 0), and
zero = (maxq + 1) / 2; an all-zero row gets [-1, 1]. Codes are 0..2^b - 1 (``QuantSpec`` with
``symmetric=False``; GPTQ's symmetric grid is that grid with a fixed zero-point).

Layers are visited through the layer-wise engine, segment by segment (stem, units, head), so each
layer sees the already-quantized upstream. ``sequential=true`` (the reference's LLaMA
"true-sequential"): inside a segment, layers that read the same input tensor form a group (q/k/v,
up/gate) and groups are fitted in execution order, each group's inputs re-collected with the earlier
groups quantized; ``false`` (Q-DiT): all layers of a segment are fitted on one collection.
Activation quantizers (if any) are on while inputs are collected, so H comes from
activation-quantized inputs (Q-DiT inserts its activation quantizers before GPTQ).
Activations: ``act_quant: minmax`` (per-tensor, calibrated like RTN), ``dynamic`` (per token,
groups of ``act_group_size`` channels, computed per forward; Q-DiT's W4A8) or float (``bits=w4a16``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..engine import LayerwiseEngine
from ..errors import ConfigError
from ..quant import QuantSpec, set_quant_state
from ..quant.modules import QuantConv2d, _QuantWeighted
from .common import MethodSpecs


def specs(w_bits: int, a_bits: int, keep_8bit: bool = True, group_size: int = -1, sym: bool = False, act_order: bool = False,
          static_groups: bool = False, damp: float = 0.01, block_size: int = 128, sequential: bool = True,
          act_quant: str = "minmax", act_group_size: int = 128, **_) -> MethodSpecs:
    if int(group_size) == 0 or int(group_size) < -1:
        raise ConfigError(f"ptq.options.group_size={group_size}: use -1 (per output channel) or a group size such as 128")
    if not 0 <= float(damp) < 1:
        raise ConfigError(f"ptq.options.damp={damp}: the dampening is a fraction of mean(diag H) in [0, 1), e.g. 0.01")
    weight = QuantSpec(bits=w_bits, granularity="group" if int(group_size) > 0 else "channel", axis=0,
                       group_size=max(1, int(group_size)), estimator="minmax")
    if act_quant == "minmax":
        act = QuantSpec(bits=a_bits, estimator="minmax")
        matmul = softmax = act
    elif act_quant == "dynamic":
        act = QuantSpec(bits=a_bits, dynamic=True, granularity="group", group_size=int(act_group_size))
        matmul = softmax = None  # Q-DiT: attention matmuls stay float
    else:
        raise ConfigError(f"ptq.options.act_quant={act_quant!r}: use minmax (static per-tensor) or dynamic (per token group)")
    opts = dict(group_size=int(group_size), sym=bool(sym), act_order=bool(act_order), static_groups=bool(static_groups),
                damp=float(damp), block_size=int(block_size), sequential=bool(sequential))
    return MethodSpecs(weight=weight, act=act, softmax=softmax, matmul=matmul, keep_8bit=keep_8bit,
                       edge_act=QuantSpec(bits=8, estimator="minmax") if act_quant == "dynamic" else None,
                       weight_step=gptq_weights, options=opts)


# ---------------------------------------------------------------------------------------------
# the algorithm on one weight matrix


def gptq_qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's quantizer parameters per row of ``w`` (rows, cols): (scale, zero), each (rows,)."""
    maxq = 2**bits - 1
    zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(1).values, zeros)
    xmax = torch.maximum(w.max(1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        neg = xmin < 0
        xmin = torch.where(neg, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def _quant(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero), q


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False, act_order: bool = False,
                  static_groups: bool = False, damp: float = 0.01, block_size: int = 128) -> dict:
    """Quantize ``W`` (out, in) given the input Hessian ``H`` (in, in), as the reference does.

    Returns codes (out, in), scale and zero ((out,) per channel; (out, groups) with groups), gidx
    (per input column, its group; None without groups) and the dequantized weight Q."""
    maxq = 2**bits - 1
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    cols = W.shape[1]
    gs = int(group_size)
    if gs > 0 and cols % gs and not act_order:
        raise ConfigError(f"GPTQ group_size={gs} does not divide the layer's {cols} input columns")
    ch_scale, ch_zero = gptq_qparams(W, bits, sym)  # per channel: from W before the dead-column fix
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = None
    if gs > 0 and static_groups:
        groups = [gptq_qparams(W[:, i:i + gs], bits, sym) for i in range(0, cols, gs)]
    perm = invperm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    d = torch.arange(cols, device=W.device)
    H[d, d] += damp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale, zero = ch_scale, ch_zero
    col_scale = torch.zeros_like(W)
    col_zero = torch.zeros_like(W)
    group_of = torch.zeros(cols, dtype=torch.long, device=W.device)  # processing position -> group id
    dyn_params: list = []
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if gs > 0:
                if static_groups:
                    g = int(perm[j]) // gs if act_order else j // gs
                    scale, zero = groups[g]
                    group_of[j] = g
                else:
                    if j % gs == 0:
                        scale, zero = gptq_qparams(W[:, j:j + gs], bits, sym)
                        dyn_params.append((scale, zero))
                    group_of[j] = len(dyn_params) - 1
            w = W1[:, i]
            q, c = _quant(w, scale, zero, maxq)
            Q[:, j], codes[:, j] = q, c
            col_scale[:, j], col_zero[:, j] = scale, zero
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        Q, codes, group_of = Q[:, invperm], codes[:, invperm], group_of[invperm]
        col_scale, col_zero = col_scale[:, invperm], col_zero[:, invperm]
    out = {"Q": Q, "codes": codes, "gidx": None}
    if gs <= 0:
        out.update(scale=ch_scale, zero=ch_zero)
    elif static_groups or not act_order:
        params = groups if static_groups else dyn_params
        out.update(scale=torch.stack([p[0] for p in params], 1), zero=torch.stack([p[1] for p in params], 1))
    else:  # act-order with dynamic groups: groups are scattered in original column order
        out.update(scale=torch.stack([p[0] for p in dyn_params], 1), zero=torch.stack([p[1] for p in dyn_params], 1), gidx=group_of)
    return out


# ---------------------------------------------------------------------------------------------
# collecting H through the engine


class HessianAccumulator:
    """H = running mean of (2 / n) x^T x over calls, as the reference's ``add_batch``; under
    torchrun the per-rank means are combined by their counts."""

    def __init__(self, layer: _QuantWeighted):
        self.layer = layer
        cols = layer.weight[0].numel()
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=layer.weight.device)
        self.n = 0

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        if isinstance(m, QuantConv2d):
            if x.dim() == 3:
                x = x[None]
            u = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # (B, C*k*k, L)
            return u.permute(1, 0, 2).flatten(1)  # (C*k*k, B*L)
        if x.dim() == 1:
            x = x[None]
        return x.reshape(-1, x.shape[-1]).t()

    def add(self, x: torch.Tensor) -> None:
        # the reference counts the leading dim of each call; a 2-D Linear input (or 3-D conv input) is one call
        tmp = 1 if x.dim() == (3 if isinstance(self.layer, QuantConv2d) else 2) else x.shape[0]
        inp = self.rows(x)
        self.H *= self.n / (self.n + tmp)
        self.n += tmp
        inp = math.sqrt(2 / self.n) * inp.float()
        self.H += inp @ inp.t()

    def reduce(self) -> torch.Tensor:
        if dist.world() > 1:
            tot = torch.tensor([float(self.n)], dtype=torch.float64)
            dist.all_reduce_sum(tot)
            self.H *= self.n / float(tot)
            dist.all_reduce_sum(self.H)
        return self.H


def input_groups(seg, layers) -> list[list]:
    """Consecutive layers (in execution order) that read the same input tensor form one group."""
    seen = []
    wanted = {m for _, m in layers}
    # keep the input tensors themselves (compared by identity): an id() of a tensor freed during the
    # pass can be reused by a later one, which grouped o_proj with gate/up at random
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])) if mod in wanted else None)
             for _, m in layers]
    try:
        with torch.no_grad():
            seg.run(next(seg.inputs()))
    finally:
        for h in hooks:
            h.remove()
    by_mod = {m: n for n, m in layers}
    groups, last_id = [], None
    done = set()
    for mod, x in seen:
        if mod in done:
            continue
        done.add(mod)
        if groups and x is last_id:
            groups[-1].append((by_mod[mod], mod))
        else:
            groups.append([(by_mod[mod], mod)])
        last_id = x
    return groups


@torch.no_grad()
def gptq_weights(adapter, batches, specs: MethodSpecs, settings: dict, store=None) -> dict:
    """GPTQ every quantized weight of the model, segment by segment (see the module docstring)."""
    o = specs.options
    model = adapter.model
    set_quant_state(model, weight=False, act=True)
    losses = {}
    n_layers = 0
    for seg in LayerwiseEngine(adapter, batches, kinds=("stem", "unit", "head"), store=store, desc="gptq"):
        layers = [(n, m) for n, m in seg.layers() if m.w_quant is not None]
        if not layers:
            continue
        groups = input_groups(seg, layers) if o["sequential"] else [layers]
        for group in groups:
            acc = {m: HessianAccumulator(m) for _, m in group}

            def pre_hook(mod, args):
                x = args[0]
                if mod.a_on and mod.in_quant is not None:
                    x = mod.in_quant(x)
                acc[mod].add(x)

            hooks = [m.register_forward_pre_hook(pre_hook) for _, m in group]
            try:
                for inp in seg.inputs():
                    seg.run(inp)
            finally:
                for h in hooks:
                    h.remove()
            for name, m in group:
                losses[name] = quantize_layer(m, acc[m].reduce(), o)
                m.set_quant_state(True, m.a_on)
                n_layers += 1
    return {"gptq_layers": n_layers, "gptq_objective": losses}


def quantize_layer(m: _QuantWeighted, H: torch.Tensor, o: dict) -> float:
    """GPTQ one layer in place (codes + parameters); returns the objective tr((W-Q) H (W-Q)^T) / out."""
    spec = m.w_quant.spec
    W = m.weight.detach().flatten(1)
    conv = isinstance(m, QuantConv2d)
    gs = -1 if conv or spec.granularity != "group" else spec.group_size
    r = gptq_quantize(W, H, spec.bits, gs, o["sym"], o["act_order"], o["static_groups"], o["damp"], o["block_size"])
    dt = m.weight.dtype
    if gs <= 0:
        shape = [-1] + [1] * (m.weight.dim() - 1)
        if spec.granularity != "channel":  # conv edge layers etc.: per channel for GPTQ
            from ..quant.modules import Quantizer

            m.w_quant = Quantizer(spec.with_(granularity="channel", axis=0), m.w_quant.max_elements).to(m.weight.device)
        m.w_quant.set_params(r["scale"].view(shape).to(dt), r["zero"].view(shape).to(dt))
    elif r["gidx"] is None:
        m.w_quant.set_params(r["scale"][..., None].to(dt), r["zero"][..., None].to(dt))
    else:
        m.w_quant.set_params(r["scale"].to(dt), r["zero"].to(dt))
    m.set_weight_codes(r["codes"].reshape(m.weight.shape), r["gidx"])
    D = (W.float() - r["Q"])
    return float(torch.einsum("oi,ij,oj->", D, H.float(), D) / W.shape[0])
