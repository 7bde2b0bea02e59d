"""StreamingLeastSquares (qwt/compensation/lstsq.py): the streamed normal-equation solve."""
import pytest
import torch

from qwt.compensation.lstsq import StreamingLeastSquares


def problem(n=600, d_in=12, d_out=5, noise=0.1, seed=0, groups=None):
    g = torch.Generator().manual_seed(seed)
    lead = () if groups is None else (groups,)
    X = torch.randn(*lead, n, d_in, generator=g, dtype=torch.float64) * 2 + 0.5
    W = torch.randn(*lead, d_in, d_out, generator=g, dtype=torch.float64)
    b = torch.randn(*lead, 1, d_out, generator=g, dtype=torch.float64)
    R = X @ W + b + noise * torch.randn(*lead, n, d_out, generator=g, dtype=torch.float64)
    return X, R


def reference(X, R):
    A = torch.cat([X, torch.ones_like(X[..., :1])], dim=-1)
    theta = torch.linalg.lstsq(A, R).solution
    return theta[..., :-1, :], theta[..., -1, :]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("ridge", [0.0, 1e-12])
def test_solve_equals_torch_lstsq(ridge):
    X, R = problem()
    s = StreamingLeastSquares(X.shape[1], R.shape[1])
    s.update(X, R)
    W, b = s.solve(ridge)
    W_ref, b_ref = reference(X, R)
    assert W.shape == (1, 12, 5) and b.shape == (1, 5) and W.dtype == torch.float64
    assert rel(W[0], W_ref) <= 1e-6 and rel(b[0], b_ref) <= 1e-6
    assert s.n == X.shape[0] and s.ridge_used == ridge


def test_float32_inputs_are_accumulated_in_float64():
    X, R = problem(n=2000, d_in=8, d_out=3, seed=2)
    s = StreamingLeastSquares(8, 3)
    s.update(X.float(), R.float())
    W, b = s.solve(0.0)
    W_ref, b_ref = reference(X.float().double(), R.float().double())
    assert W.dtype == torch.float64
    assert rel(W[0], W_ref) <= 1e-6 and rel(b[0], b_ref) <= 1e-6


def test_independent_of_batch_split():
    X, R = problem(n=777, seed=1)
    one = StreamingLeastSquares(12, 5)
    one.update(X, R)
    many = StreamingLeastSquares(12, 5)
    cuts = [0, 1, 50, 51, 300, 641, 777]  # uneven, including a single-row batch
    for a, c in zip(cuts[:-1], cuts[1:]):
        many.update(X[a:c], R[a:c])
    assert many.n == one.n == 777
    W1, b1 = one.solve(0.0)
    W2, b2 = many.solve(0.0)
    assert rel(W2, W1) <= 1e-10 and rel(b2, b1) <= 1e-10
    assert abs(one.r2(W1, b1) - many.r2(W2, b2)) <= 1e-10


def test_grouped_problems_equal_separate_solves():
    groups = 3
    X, R = problem(n=400, d_in=6, d_out=4, groups=groups, seed=3)
    s = StreamingLeastSquares(6, 4, groups=groups)
    s.update(X[:, :150], R[:, :150])
    s.update(X[:, 150:], R[:, 150:])
    W, b = s.solve(0.0)
    assert W.shape == (groups, 6, 4) and b.shape == (groups, 4)
    for gi in range(groups):
        single = StreamingLeastSquares(6, 4)
        single.update(X[gi], R[gi])
        Wg, bg = single.solve(0.0)
        assert rel(W[gi], Wg[0]) <= 1e-10 and rel(b[gi], bg[0]) <= 1e-10
        W_ref, b_ref = reference(X[gi], R[gi])
        assert rel(W[gi], W_ref) <= 1e-6 and rel(b[gi], b_ref) <= 1e-6


@pytest.mark.parametrize("noise", [0.05, 1.0, 10.0])
def test_r2_matches_direct_computation(noise):
    X, R = problem(n=500, d_in=10, d_out=4, noise=noise, seed=4)
    s = StreamingLeastSquares(10, 4)
    for chunk in range(0, 500, 128):
        s.update(X[chunk:chunk + 128], R[chunk:chunk + 128])
    W, b = s.solve(1e-6)
    fit = X @ W[0] + b[0]
    direct = 1 - float((R - fit).pow(2).sum()) / float((R - R.mean(0)).pow(2).sum())
    assert abs(s.r2(W, b) - direct) <= 1e-8
    # and the streamed SSE / SST match their definitions
    assert abs(float(s.sse(W, b).sum()) - float((R - fit).pow(2).sum())) <= 1e-8 * float(R.pow(2).sum())
    assert abs(float(s.sst().sum()) - float((R - R.mean(0)).pow(2).sum())) <= 1e-8 * float(R.pow(2).sum())
    if noise == 0.05:
        assert s.r2(W, b) > 0.99
    # a bad fit can have R^2 < 0 (used by QwT's gate)
    assert s.r2(torch.zeros_like(W), b + 100.0) < 0


def test_r2_of_grouped_problem_pools_groups():
    X, R = problem(n=300, d_in=5, d_out=3, groups=2, noise=0.5, seed=5)
    s = StreamingLeastSquares(5, 3, groups=2)
    s.update(X, R)
    W, b = s.solve(0.0)
    fit = X @ W + b[:, None, :]
    direct = 1 - float((R - fit).pow(2).sum()) / float((R - R.mean(1, keepdim=True)).pow(2).sum())
    assert abs(s.r2(W, b) - direct) <= 1e-8


def test_constant_target_gives_r2_zero():
    X, _ = problem(n=100, d_in=4, d_out=2)
    s = StreamingLeastSquares(4, 2)
    s.update(X, torch.zeros(100, 2, dtype=torch.float64))
    W, b = s.solve(1e-6)
    assert float(W.abs().max()) == 0.0 and float(b.abs().max()) == 0.0
    assert s.r2(W, b) <= 0.0  # SST = 0: no variance to explain


@pytest.mark.parametrize("kind", ["duplicate", "zero", "rank1"])
def test_singular_x_gives_finite_output(kind):
    X, R = problem(n=200, d_in=6, d_out=3, seed=6)
    if kind == "duplicate":
        X[:, 3] = X[:, 1]
    elif kind == "zero":
        X[:, 2] = 0.0
    else:
        X = X[:, :1].repeat(1, 6)
    s = StreamingLeastSquares(6, 3)
    s.update(X, R)
    W, b = s.solve(0.0)  # singular: where the plain Cholesky fails, the ridge is raised until it succeeds
    assert torch.isfinite(W).all() and torch.isfinite(b).all()
    assert s.ridge_used is not None
    if kind == "zero":  # an exactly zero column gives G a zero pivot: the plain Cholesky fails on every machine
        assert s.ridge_used > 0
    # (duplicate / rank-1 columns: rounding may leave a tiny positive pivot, so the plain solve can succeed)
    # the fit is still (nearly) the least-squares optimum of the rank-deficient problem
    A = torch.cat([X, torch.ones_like(X[:, :1])], dim=-1)
    best = torch.linalg.lstsq(A, R, driver="gelsd").solution
    sse_best = float((R - A @ best).pow(2).sum())
    sse = float((R - X @ W[0] - b[0]).pow(2).sum())
    assert sse <= sse_best * (1 + 1e-4)
    r2 = s.r2(W, b)
    assert r2 == r2 and abs(r2) < 10  # finite


def test_relative_ridge_shrinks_toward_zero():
    X, R = problem(n=300, d_in=6, d_out=3, seed=7)
    s = StreamingLeastSquares(6, 3)
    s.update(X, R)
    W0, _ = s.solve(0.0)
    W1, _ = s.solve(1.0)
    assert float(W1.norm()) < float(W0.norm())
    # lambda = ridge * mean(diag(A^T A)): check against the direct ridge solution
    A = torch.cat([X, torch.ones_like(X[:, :1])], dim=-1)
    G = A.T @ A
    lam = float(G.diagonal().mean())
    theta = torch.linalg.solve(G + lam * torch.eye(7, dtype=torch.float64), A.T @ R)
    assert rel(W1[0], theta[:-1]) <= 1e-10
