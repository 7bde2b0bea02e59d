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


class ReferenceInverseSolve:
    """The official QwT code's regression: every row kept (float32), the ones column appended,
    theta = inverse(X1^T X1 + ridge I) @ X1^T @ Y evaluated left to right (ridge: 0 for the vision
    blocks; an absolute 1e-3 for the ResNet grouped branch); R^2 from the fitted predictions,
    1 - sum((Y - X W - b)^2) / sum((Y - mean(Y))^2), one scalar over all groups and columns, where
    the mean is over all rows for token rows and over the batch (per channel and pixel) for conv
    rows (``positions`` rows per sample), as the reference computes it. On rank-deficient inputs
    the float32 inverse is garbage or inf, and R^2 is negative or NaN (the gate then switches the
    block off, as in the reference). Under torchrun the rows of every rank are gathered."""

    def __init__(self, d_in: int, d_out: int, groups: int = 1, device=None, positions: int = 1):
        self.d_in, self.d_out, self.groups = d_in, d_out, groups
        self.positions = positions
        self.X: list = []
        self.R: list = []
        self.ridge_used = 0.0

    @torch.no_grad()
    def update(self, X: torch.Tensor, R: torch.Tensor) -> None:
        if X.dim() == 2:
            X, R = X[None], R[None]
        self.X.append(X.float())
        self.R.append(R.float())

    def all_reduce(self) -> None:
        self.X = [torch.cat(self.X, dim=1)]
        self.R = [torch.cat(self.R, dim=1)]
        if dist.world() > 1:
            self.X, self.R = [dist.all_gather_rows(self.X[0], dim=1)], [dist.all_gather_rows(self.R[0], dim=1)]

    @torch.no_grad()
    def solve(self, ridge: float = 0.0):
        Ws, bs, res, tot = [], [], 0.0, 0.0
        P = self.positions
        for X, R in zip(self.X[0], self.R[0]):  # one plain 2-D problem per group, as the reference
            X1 = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], dim=-1)
            X1t = X1.t()
            XtX = X1t @ X1
            if ridge:
                XtX = XtX + ridge * torch.eye(XtX.shape[0], dtype=XtX.dtype, device=XtX.device)
            try:
                theta = torch.inverse(XtX) @ X1t @ R
            except torch.linalg.LinAlgError:  # exactly singular in float32: no fit (NaN R^2: the gate is off)
                theta = torch.full((X1.shape[1], R.shape[1]), float("nan"), dtype=R.dtype, device=R.device)
            W, b = theta[:-1, :], theta[-1, :]
            pred = X @ W + b
            n, d = R.shape
            Rm = R.view(n // P, P, d).mean(dim=0, keepdim=True).expand(n // P, P, d).reshape(n, d)
            res += float(torch.sum((R - pred).pow(2)))
            tot += float(torch.sum((R - Rm).pow(2)))
            Ws.append(W)
            bs.append(b)
        self.ridge_used = float(ridge)
        self._r2 = 1 - res / tot if tot > 0 else float("nan")
        return torch.stack(Ws).double(), torch.stack(bs).double()

    def r2(self, W, b) -> float:
        return self._r2


class NoInterceptLeastSquares(StreamingLeastSquares):
    """The QwT LLaMA reference's equation with streamed float64 statistics: W from the regression
    *without* an intercept column, min ||R - X W||^2 (Cholesky of X^T X + lambda I, relative ridge
    as above), then b = mean(R - X W). The statistics are those of the augmented rows, so
    b = (1^T R - 1^T X W) / n and R^2 are exact."""

    @torch.no_grad()
    def solve(self, ridge: float = 1e-6, max_tries: int = 12):
        d = self.d_in
        G, C = self.G[:, :d, :d], self.C[:, :d, :]
        eye = torch.eye(d, dtype=torch.float64, device=G.device)
        scale = G.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)[:, None, None]
        lam = float(ridge)
        for _ in range(max_tries):
            L, info = torch.linalg.cholesky_ex(G + lam * scale * eye)
            if int(info.max()) == 0:
                W = torch.cholesky_solve(C, L)
                if torch.isfinite(W).all():
                    self.ridge_used = lam
                    xsum = self.G[:, d, :d]  # 1^T X
                    b = (self.C[:, d, :] - (xsum[:, None, :] @ W)[:, 0, :]) / max(1, self.n)
                    return W, b
            lam = max(lam * 10, 1e-12)
        raise RuntimeError("least-squares solve failed even with a large ridge; the calibration features are degenerate")


class ReferenceLstsqSolve:
    """The QwT LLaMA reference exactly (``qwerty_llama.py``): every row kept in float32 on the CPU,
    W = torch.linalg.lstsq(X, R) (CPU default driver gelsy: rank truncated at rcond = eps x rows)
    without an intercept column, b = mean(R - X W); one pooled R^2 from the predictions,
    1 - sum((R - X W - b)^2) / sum((R - mean R)^2). ``ridge`` is ignored (the reference has none)."""

    def __init__(self, d_in: int, d_out: int, groups: int = 1, device=None, **_):
        if groups != 1:
            raise ValueError("the lstsq solver fits token rows (one group)")
        self.d_in, self.d_out, self.device = d_in, d_out, device
        self.X: list = []
        self.R: list = []
        self.ridge_used = 0.0

    @torch.no_grad()
    def update(self, X: torch.Tensor, R: torch.Tensor) -> None:
        if X.dim() == 3:
            X, R = X[0], R[0]
        self.X.append(X.float().cpu())
        self.R.append(R.float().cpu())

    def all_reduce(self) -> None:
        self.X, self.R = [torch.cat(self.X)], [torch.cat(self.R)]
        if dist.world() > 1:
            self.X, self.R = [dist.all_gather_rows(self.X[0], dim=0)], [dist.all_gather_rows(self.R[0], dim=0)]

    @torch.no_grad()
    def solve(self, ridge: float = 0.0):
        X, R = self.X[0], self.R[0]
        W = torch.linalg.lstsq(X, R).solution
        b = (R - X @ W).mean(dim=0)
        res = float((R - X @ W - b).pow(2).sum())
        tot = float((R - R.mean(dim=0)).pow(2).sum())
        self._r2 = 1 - res / tot if tot > 0 else float("nan")
        dev = self.device if self.device is not None else "cpu"
        return W[None].double().to(dev), b[None].double().to(dev)

    def r2(self, W, b) -> float:
        return self._r2


SOLVERS = {"cholesky": StreamingLeastSquares, "inverse": ReferenceInverseSolve,
           "nointercept": NoInterceptLeastSquares, "lstsq": ReferenceLstsqSolve}
