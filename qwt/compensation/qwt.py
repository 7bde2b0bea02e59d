"""QwT (Quantization without Tears): a linear side branch per block, fitted in closed form.

    Y = block_Q(X) + X W + b

Blocks are fitted in order. For block k, X is the output of the already-compensated quantized
blocks 0..k-1 (the quantized path's own activations). The same X goes through block k with
quantization off (Y_FP) and on (Y_Q); W, b minimise ||(Y_FP - Y_Q) - X W - b||^2 (every token /
pixel a row), solved from streamed float64 statistics (``lstsq.py``). R^2 gate: a block whose
fit has R^2 <= 0 gets no branch. ``start_block`` leaves earlier blocks alone.

ResNet blocks change shape, so their branch is a grouped 1x1 convolution (``group_channels``
input channels per group, stride = the block's spatial stride), each group an independent
regression (the QwT paper's ResNet variant; its ridge is 1e-3).
"""
from __future__ import annotations


import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import dist

from ..quant import set_quant_state
from .base import CompContext
from .lstsq import StreamingLeastSquares


class QwTBlock(nn.Module):
    """block(x) + branch(x); the branch is active only when the model runs quantized."""

    follows_quant_state = True

    def __init__(self, block: nn.Module, branch: nn.Module, r2: float, fp16: bool = False):
        super().__init__()
        self.block = block
        self.branch = branch
        self.r2 = r2
        self.fp16 = fp16
        self.active = True

    def set_quant_state(self, weight: bool, act: bool):
        self.active = bool(weight or act)

    def forward(self, x, *args, **kwargs):
        y = self.block(x, *args, **kwargs)
        if not self.active:
            return y
        if self.fp16:
            return y + self.branch(x.half()).to(y.dtype)
        return y + self.branch(x)

    def extra_param_count(self) -> int:
        return sum(p.numel() for p in self.branch.parameters())

    def compensation_parameters(self):
        return list(self.branch.parameters())


class _Rows:
    """How a block's (X, R) become regression rows, and the branch module built from W, b."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, conv: bool, group_channels: int):
        self.conv = conv
        if self.conv:
            self.c_in, self.c_out = x.shape[1], y.shape[1]
            self.stride = max(1, round(x.shape[2] / y.shape[2]))
            self.groups = max(1, self.c_in // group_channels)
            if self.c_in % self.groups or self.c_out % self.groups:
                self.groups = 1
            self.d_in, self.d_out = self.c_in // self.groups, self.c_out // self.groups
        else:
            self.groups, self.d_in, self.d_out = 1, x.shape[-1], y.shape[-1]

    def __call__(self, x, r):
        if not self.conv:
            return x.reshape(-1, self.d_in), r.reshape(-1, self.d_out)
        xs = x[:, :, :: self.stride, :: self.stride]
        g = self.groups
        X = xs.permute(0, 2, 3, 1).reshape(-1, g, self.d_in).transpose(0, 1)
        R = r.permute(0, 2, 3, 1).reshape(-1, g, self.d_out).transpose(0, 1)
        return X, R

    def branch(self, W: torch.Tensor, b: torch.Tensor, dtype, device) -> nn.Module:
        if not self.conv:
            m = nn.Linear(self.d_in, self.d_out)
            m.weight.data = W[0].T.to(device, dtype).contiguous()
            m.bias.data = b[0].to(device, dtype)
            return m
        m = nn.Conv2d(self.c_in, self.c_out, 1, stride=self.stride, groups=self.groups, bias=True)
        # group j: out channels j*d_out.., in channels j*d_in..; weight (c_out, d_in, 1, 1)
        m.weight.data = W.transpose(1, 2).reshape(self.c_out, self.d_in, 1, 1).to(device, dtype).contiguous()
        m.bias.data = b.reshape(self.c_out).to(device, dtype)
        return m


@torch.no_grad()
def apply(ctx: CompContext, cfg: dict) -> dict:
    """Fit and insert QwT branches into ``ctx.adapter.model``; returns per-block R^2 etc."""
    adapter = ctx.adapter
    model = adapter.model
    batches = ctx.calib_images(cfg)
    set_quant_state(model, True, True)
    hs = [adapter.stem(x) for x in batches]
    record = cfg.get("_record")  # tests: {unit index: first regression X}
    r2s, fitted, ridge_used = [], 0, []
    for k, unit in enumerate(tqdm(adapter.units(), desc="qwt blocks", disable=not dist.is_main(), leave=False)):
        xs = [adapter.unit_input(unit, h) for h in hs]
        block = adapter.get(unit.name)
        if k < int(cfg.get("start_block", 0)):
            hs = [block(x) for x in xs]
            r2s.append(None)
            continue
        if record is not None:
            record[k] = xs[0].clone()
        solver = rows = None
        for x in xs:
            set_quant_state(block, False, False)
            y_fp = block(x)
            set_quant_state(block, True, True)
            y_q = block(x)
            if rows is None:
                rows = _Rows(x, y_q, adapter.unit_layout == "nchw", int(cfg.get("group_channels", 64)))
                solver = StreamingLeastSquares(rows.d_in, rows.d_out, rows.groups, device=x.device)
            solver.update(*rows(x, y_fp - y_q))
        solver.all_reduce()
        ridge = float(cfg["ridge_conv"] if rows.conv else cfg["ridge"])
        W, b = solver.solve(ridge)
        r2 = solver.r2(W, b)
        r2s.append(r2)
        ridge_used.append(solver.ridge_used)
        if r2 > 0:
            branch = rows.branch(W, b, torch.float16 if cfg.get("fp16") else xs[0].dtype, xs[0].device)
            block = QwTBlock(block, branch, r2, fp16=bool(cfg.get("fp16")))
            adapter.set_module(unit.name, block)
            fitted += 1
        hs = [block(x) for x in xs]
    return {"r2": r2s, "blocks_compensated": fitted, "ridge_used": ridge_used}
