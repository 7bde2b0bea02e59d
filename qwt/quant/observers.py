"""Range estimators, kept apart from the quantizer: they see calibration data and return
(scale, zero) for a ``QuantSpec``.

minmax             streaming min / max
percentile_search  RepQ-ViT: candidates p in {0.999, 0.9999, 0.99999}; [quantile(1-p), quantile(p)];
                   keep, per scale, the candidate with the lowest L2 reconstruction error
mse                clipping ratios of [min, max], keep the lowest L2 error
hist_percentile    symmetric amax = the ``percentile`` of |x| read off a 2048-bin histogram
"""
from __future__ import annotations

import torch

from .quantizer import QuantSpec, fake_quant_log_sqrt2, fake_quant_uniform, param_shape, qparams_from_range, to_stat_view

REPQ_PERCENTILES = (0.999, 0.9999, 0.99999)
MSE_RATIOS = tuple(1.0 - 0.05 * i for i in range(16))  # 1.0 .. 0.25
HIST_BINS = 2048


def rowwise_quantiles(v: torch.Tensor, qs) -> list[torch.Tensor]:
    """Quantiles ``qs`` along the last dim with linear interpolation (no 16M-element limit);
    one sort serves every quantile."""
    s = v.sort(dim=-1).values
    out = []
    for q in qs:
        pos = q * (s.shape[-1] - 1)
        lo_i, hi_i = int(pos), min(int(pos) + 1, s.shape[-1] - 1)
        frac = pos - int(pos)
        out.append(s[..., lo_i] * (1 - frac) + s[..., hi_i] * frac)
    return out


def rowwise_quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile along the last dim with linear interpolation (no 16M-element limit)."""
    return rowwise_quantiles(v, [q])[0]


TORCH_QUANTILE_LIMIT = 16_000_000  # torch.quantile refuses larger inputs


def torch_quantiles(v: torch.Tensor, qs) -> list[torch.Tensor]:
    """Quantiles along the last dim exactly as the reference code takes them: ``torch.quantile``
    (float32 rank and interpolation) per row, numpy's percentile where a row is too large for it."""
    import numpy as np

    out = []
    for q in qs:
        if v.numel() <= TORCH_QUANTILE_LIMIT:
            out.append(torch.quantile(v, float(q), dim=-1))
            continue
        vals = []
        for row in v:
            if row.numel() <= TORCH_QUANTILE_LIMIT:
                vals.append(torch.quantile(row, float(q)))
            else:  # the reference's fallback: np.percentile(x, q * 100) as float32
                vals.append(torch.tensor(np.percentile(row.cpu().numpy(), float(q) * 100), dtype=torch.float32, device=v.device))
        out.append(torch.stack(vals))
    return out


def quantiles(v: torch.Tensor, qs, spec: QuantSpec) -> list[torch.Tensor]:
    return torch_quantiles(v, qs) if spec.quantile == "torch" else rowwise_quantiles(v, qs)


def _l2_rows(v, v_hat, spec: QuantSpec | None = None):
    d = (v - v_hat).pow(2)
    # the reference scores a candidate by the mean squared error; ours sums (same order up to float ties)
    return d.mean(dim=-1) if spec is not None and spec.quantile == "torch" else d.sum(dim=-1)


def _uniform_err(v, lo, hi, spec):
    scale, zero = qparams_from_range(lo, hi, spec)
    return _l2_rows(v, fake_quant_uniform(v, scale[:, None], zero[:, None], spec.qmin, spec.qmax), spec), scale, zero


def _search(v, candidates, spec):
    """Pick per row the (lo, hi) candidate with the lowest L2 error."""
    best_err = best_scale = best_zero = None
    for lo, hi in candidates:
        err, scale, zero = _uniform_err(v, lo, hi, spec)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def hist_amax(v: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per row: the upper edge of the histogram bin where the CDF of |x| reaches ``percentile``."""
    out = []
    for row in v.abs():
        m = float(row.max())
        if m == 0.0:
            out.append(row.new_tensor(0.0))
            continue
        hist = torch.histc(row.float(), bins=HIST_BINS, min=0.0, max=m)
        cdf = hist.cumsum(0) / hist.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=cdf.dtype)))
        out.append(row.new_tensor((min(idx, HIST_BINS - 1) + 1) * m / HIST_BINS))
    return torch.stack(out)


def compute_qparams(v: torch.Tensor, spec: QuantSpec):
    """(scale, zero) of shape (rows,) for the stat view ``v`` (rows, n)."""
    v = v.float()
    if spec.scheme == "log_sqrt2":
        # delta candidates = high quantiles of x (values are in [0, 1] after softmax)
        best_err, best_delta = None, None
        cands = quantiles(v, REPQ_PERCENTILES, spec) if spec.estimator != "minmax" else [v.amax(-1)]
        for delta in cands:
            delta = delta.clamp_min(1e-8)
            err = _l2_rows(v, fake_quant_log_sqrt2(v, delta[:, None], spec.bits, spec.log_floor), spec)
            if best_err is None or bool((err < best_err).all()):
                best_err, best_delta = err, delta
        return best_delta, torch.zeros_like(best_delta)
    if spec.estimator == "minmax":
        return qparams_from_range(v.amin(-1), v.amax(-1), spec)
    if spec.estimator == "percentile_search":
        qs = quantiles(v, [f(p) for p in REPQ_PERCENTILES for f in (lambda p: 1.0 - p, lambda p: p)], spec)
        cands = list(zip(qs[0::2], qs[1::2]))
        return _search(v, cands, spec)
    if spec.estimator == "mse":
        lo, hi = v.amin(-1), v.amax(-1)
        return _search(v, [(lo * r, hi * r) for r in MSE_RATIOS], spec)
    if spec.estimator == "hist_percentile":
        if not spec.symmetric:
            raise ValueError("estimator 'hist_percentile' is symmetric (amax); set symmetric=true")
        amax = hist_amax(v, spec.percentile)
        return qparams_from_range(-amax, amax, spec)
    raise ValueError(f"unknown estimator {spec.estimator!r}")


class Observer:
    """Collects calibration data for one quantizer, then computes its parameters.

    minmax streams; the other estimators keep the observed values (per scale row), randomly
    thinned to at most ``max_elements`` so memory stays bounded on big calibration sets.
    """

    def __init__(self, spec: QuantSpec, max_elements: int = 2**23, seed: int = 0):
        self.spec = spec
        self.max_elements = int(max_elements)
        self.gen = torch.Generator().manual_seed(seed)
        self.shape = None
        self.lo = self.hi = None
        self.chunks: list[torch.Tensor] = []
        self.n_cols = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.spec.granularity == "group" and self.shape is not None:
            raise ValueError("static per-group quantization is for weights (observed once); activations need per-tensor or per-channel")
        if self.spec.granularity != "tensor" and self.shape is not None and self.spec.granularity == "channel":
            axis = self.spec.axis % x.dim()
            if x.shape[axis] != self.shape[self.spec.axis % len(self.shape)]:
                raise ValueError("per-channel observer saw inputs with different channel counts")
        self.shape = x.shape
        v = to_stat_view(x.float(), self.spec)
        if self.spec.estimator == "minmax" and self.spec.scheme == "uniform":
            lo, hi = v.amin(-1), v.amax(-1)
            self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
            self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
            return
        self.chunks.append(v)
        self.n_cols += v.shape[1]
        limit = max(1, self.max_elements // v.shape[0])
        if self.n_cols > 2 * limit:
            self._thin(limit)

    def _thin(self, limit):
        v = torch.cat(self.chunks, dim=1)
        keep = torch.randperm(v.shape[1], generator=self.gen)[:limit].to(v.device)
        self.chunks, self.n_cols = [v[:, keep]], limit

    def compute(self):
        if self.shape is None:
            raise RuntimeError("observer saw no data: run calibration batches through the model first")
        if self.lo is not None:
            scale, zero = qparams_from_range(self.lo, self.hi, self.spec)
        else:
            limit = max(1, self.max_elements // self.chunks[0].shape[0])
            if self.n_cols > limit:
                self._thin(limit)
            scale, zero = compute_qparams(torch.cat(self.chunks, dim=1), self.spec)
        shape = param_shape(self.shape, self.spec)
        return scale.reshape(shape), zero.reshape(shape)
