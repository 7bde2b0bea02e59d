"""QwT (Quantization without Tears): a linear side branch per block, fitted in closed form.

    Y = block_Q(X) + X W + b

Blocks (the adapter's units) are fitted in order through the layer-wise engine. For block k, X is
the output of the already-compensated quantized blocks 0..k-1 (the quantized path's own
activations); Y_Q is block k's quantized output on X. The target Y_FP (``target``):
  local   block k with quantization off on the same X (the vision reference code, the paper);
  global  the FP model's own output of block k (the FP chain), so the branch also absorbs the
          error accumulated upstream (the reference LLaMA code).
W, b minimise ||(Y_FP - Y_Q) - X W - b||^2 (every token / pixel a row), ``solver``: "cholesky"
(ours: streamed float64 statistics, relative ridge) or "inverse" (the reference code: every row
kept in float32, W = inverse(X1^T X1) X1^T Y, R^2 from the fitted predictions; see ``lstsq.py``),
"lstsq" (the LLaMA reference: torch.linalg.lstsq on float32 rows *without* an intercept column,
b = mean residual) or "nointercept" (that equation from streamed float64 statistics).
R^2 gate: a block whose fit has R^2 <= 0 (or NaN, when the float32 inverse fails) gets no branch.
``start_block`` leaves earlier blocks alone. The branch sees only the block's main input; keyword
state (masks, position embeddings, conditioning) passes through to the block unchanged.

ResNet blocks change shape, so their branch is a grouped 1x1 convolution (``group_channels``
input channels per group, stride = the block's spatial stride), each group an independent
regression (the QwT paper's ResNet variant; its ridge is 1e-3).
"""
from __future__ import annotations


import torch
import torch.nn as nn

import torch.nn.functional as F

from ..errors import ConfigError
from ..quant import set_quant_state
from .base import CompContext
from .lstsq import SOLVERS, StreamingLeastSquares


FP16_MAX = 65504.0
PRECISIONS = ("fp32", "fp16", "fp16_eval")


class QwTBlock(nn.Module):
    """block(x, ...) + branch(x); the branch is active only when the model runs quantized. A block
    returning a tuple gets the branch added to its first element.

    precision (``qwt.branch_precision``):
      fp32       the branch in the model's dtype;
      fp16       weight and bias stored in float16, x cast to half; later blocks are fitted on
                 this half branch's output;
      fp16_eval  the reference code: fitted and run in float32 while QwT (or QwT*) is fitting
                 (``fitting=True``); at inference x and the weight in float16, the product cast
                 back, plus the float32 bias.
    """

    follows_quant_state = True
    wraps_block = True

    def __init__(self, block: nn.Module, branch: nn.Module, r2: float, precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"branch precision {precision!r}: use one of {PRECISIONS}")
        self.block = block
        self.branch = branch
        self.r2 = r2
        self.precision = precision
        self.fitting = False
        self.active = True

    def set_quant_state(self, weight: bool, act: bool):
        self.active = bool(weight or act)

    def get_quant_state(self):
        return self.active, self.active

    def branch_out(self, x):
        if self.precision == "fp16":
            return self.branch(x.half())
        if self.precision == "fp16_eval" and not self.fitting:
            b = self.branch
            w = b.weight.half()
            if isinstance(b, nn.Conv2d):
                out = F.conv2d(x.half(), w, None, b.stride, b.padding, b.dilation, b.groups)
                return out.float() + b.bias.view(1, -1, 1, 1)
            return F.linear(x.half(), w).float() + b.bias
        return self.branch(x)

    def forward(self, x, *args, **kwargs):
        out = self.block(x, *args, **kwargs)
        if not self.active:
            return out
        y = out[0] if isinstance(out, tuple) else out
        y = y + self.branch_out(x).to(y.dtype)
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y

    def extra_param_count(self) -> int:
        return sum(p.numel() for p in self.branch.parameters())

    def compensation_parameters(self):
        return list(self.branch.parameters())


def set_fitting(model: nn.Module, fitting: bool) -> None:
    for m in model.modules():
        if isinstance(m, QwTBlock):
            m.fitting = fitting


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

    def positions(self, y) -> int:
        """Regression rows per sample that share a position (conv: output pixels; tokens: 1)."""
        return int(y.shape[2] * y.shape[3]) if self.conv else 1

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
    target = cfg.get("target", "local")
    solver_name = cfg.get("solver", "cholesky")
    if solver_name not in SOLVERS:
        raise ConfigError(f"compensation.qwt.solver={solver_name!r}: use one of {sorted(SOLVERS)}")
    precision = cfg.get("branch_precision", "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"compensation.qwt.branch_precision={precision!r}: use one of {PRECISIONS}")
    set_quant_state(adapter.model, True, True)
    set_fitting(adapter.model, True)
    record = cfg.get("_record")  # tests: {unit index: first regression X}
    r2s, fitted, ridge_used, kept_fp32 = [], 0, [], []
    engine = ctx.engine(cfg, fp_chain=target == "global", desc="qwt blocks")
    for seg in engine:
        k = seg.index
        if k < int(cfg.get("start_block", 0)):
            r2s.append(None)
            continue
        solver = rows = x0 = None
        for x, kw, y_fp, y_q in seg.unit_pairs(target):
            if rows is None:
                x0 = x
                rows = _Rows(x, y_q, adapter.unit_layout == "nchw", int(cfg.get("group_channels", 64)))
                kw_solver = {"positions": rows.positions(y_q)} if solver_name == "inverse" else {}
                solver = SOLVERS[solver_name](rows.d_in, rows.d_out, rows.groups, device=x.device, **kw_solver)
                if record is not None:
                    record[k] = x.clone()
            solver.update(*rows(x, y_fp - y_q))
        solver.all_reduce()
        if solver_name == "inverse":  # the reference: no ridge for token rows, an absolute ridge_conv for convs
            ridge = float(cfg["ridge_conv"]) if rows.conv else 0.0
        else:
            ridge = float(cfg["ridge_conv"] if rows.conv else cfg["ridge"])
        W, b = solver.solve(ridge)
        r2 = solver.r2(W, b)
        r2s.append(r2)
        ridge_used.append(solver.ridge_used)
        if r2 > 0:
            prec = precision
            if prec != "fp32" and (float(W.abs().max()) > FP16_MAX or float(b.abs().max()) > FP16_MAX):
                prec = "fp32"  # a branch that overflows float16 stays in float32 (recorded)
                kept_fp32.append(k)
            dtype = torch.float16 if prec == "fp16" else x0.dtype
            block = QwTBlock(seg.module, rows.branch(W, b, dtype, x0.device), r2, precision=prec)
            block.fitting = True
            seg.replace(block)
            fitted += 1
    set_fitting(adapter.model, False)
    info = {"r2": r2s, "blocks_compensated": fitted, "ridge_used": ridge_used, "target": target,
            "solver": solver_name, "branch_precision": precision}
    if kept_fp32:
        info["branches_kept_fp32"] = kept_fp32  # their weights overflow float16
    return info
