"""Streaming least squares for QwT: min_{W,b} ||R - X W - 1 b||^2, accumulated in float64.

Sufficient statistics of the augmented rows A = [X 1]:  G = A^T A,  C = A^T R,  tr(R^T R).
They are sums over rows, so batches can be added in any split and under torchrun one all-reduce
gives every rank the statistics of all rows. The solve is a Cholesky factorization of
G + lambda I with lambda = ridge * mean(diag G) (relative ridge; raised x10 until the factorization
succeeds, so a singular X still gives finite W). ``groups`` > 1 solves independent problems at
once (ResNet's grouped 1x1 compensation).
"""
from __future__ import annotations

import torch

from .. import dist


class StreamingLeastSquares:
    def __init__(self, d_in: int, d_out: int, groups: int = 1, device=None):
        self.d_in, self.d_out, self.groups = d_in, d_out, groups
        kw = dict(dtype=torch.float64, device=device)
        self.G = torch.zeros(groups, d_in + 1, d_in + 1, **kw)
        self.C = torch.zeros(groups, d_in + 1, d_out, **kw)
        self.rr = torch.zeros(groups, **kw)
        self.n = 0
        self.ridge_used = None

    @torch.no_grad()
    def update(self, X: torch.Tensor, R: torch.Tensor) -> None:
        """X: (groups, n, d_in) or (n, d_in); R: (groups, n, d_out) or (n, d_out)."""
        if X.dim() == 2:
            X, R = X[None], R[None]
        X, R = X.to(self.G.device, torch.float64), R.to(self.G.device, torch.float64)
        A = torch.cat([X, torch.ones_like(X[..., :1])], dim=-1)
        self.G += A.transpose(1, 2) @ A
        self.C += A.transpose(1, 2) @ R
        self.rr += R.pow(2).sum(dim=(1, 2))
        self.n += X.shape[1]

    def all_reduce(self) -> None:
        for t in (self.G, self.C, self.rr):
            dist.all_reduce_sum(t)
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        self.n = int(dist.all_reduce_sum(n).item())

    @torch.no_grad()
    def solve(self, ridge: float = 1e-6, max_tries: int = 12):
        """Returns W (groups, d_in, d_out) and b (groups, d_out), float64."""
        eye = torch.eye(self.d_in + 1, dtype=torch.float64, device=self.G.device)
        scale = self.G.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)[:, None, None]
        lam = float(ridge)
        for _ in range(max_tries):
            L, info = torch.linalg.cholesky_ex(self.G + lam * scale * eye)
            if int(info.max()) == 0:
                theta = torch.cholesky_solve(self.C, L)
                if torch.isfinite(theta).all():
                    self.ridge_used = lam
                    return theta[:, :-1, :], theta[:, -1, :]
            lam = max(lam * 10, 1e-12)
        raise RuntimeError("least-squares solve failed even with a large ridge; the calibration features are degenerate")

    def sse(self, W, b) -> torch.Tensor:
        theta = torch.cat([W, b[:, None, :]], dim=1)
        return self.rr - 2 * (theta * self.C).sum(dim=(1, 2)) + (theta * (self.G @ theta)).sum(dim=(1, 2))

    def sst(self) -> torch.Tensor:
        col_sum = self.C[:, -1, :]  # 1^T R
        return self.rr - col_sum.pow(2).sum(dim=1) / max(1, self.n)

    def r2(self, W, b) -> float:
        """One R^2 over all groups and output columns: 1 - SSE / SST (SST about column means)."""
        sst = float(self.sst().sum())
        return 1.0 - float(self.sse(W, b).sum()) / sst if sst > 0 else 0.0
