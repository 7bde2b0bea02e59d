"""GPTQ (qwt/ptq/gptq.py) against a direct implementation of the same equations, and as a
data-driven stage-1 method through the layer-wise engine."""
import copy

import pytest
import torch

from conftest import make_tiny_vit
from qwt.models import adapter_for
from qwt.ptq import apply_ptq, get_specs
from qwt.ptq.gptq import HessianAccumulator, gptq_qparams, gptq_quantize
from qwt.quant import QuantLinear, QuantSpec, set_quant_state


def objective(W, Q, H):
    D = (W - Q).double()
    return float(torch.einsum("oi,ij,oj->", D, H.double(), D))


def rtn(W, bits, sym, group_size=-1):
    maxq = 2**bits - 1
    if group_size > 0:
        return torch.cat([rtn(W[:, i:i + group_size], bits, sym) for i in range(0, W.shape[1], group_size)], 1)
    s, z = gptq_qparams(W, bits, sym)
    q = torch.clamp(torch.round(W / s[:, None]) + z[:, None], 0, maxq)
    return s[:, None] * (q - z[:, None])


def direct_gptq(W, H, bits, group_size=-1, sym=False, damp=0.01):
    """Optimal Brain Quantization column by column, every update applied at once (no lazy blocks):
    the equations GPTQ batches. Float64."""
    W, H = W.double().clone(), H.double().clone()
    maxq = 2**bits - 1
    s, z = gptq_qparams(W, bits, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        if group_size > 0 and i % group_size == 0:
            s, z = gptq_qparams(W[:, i:i + group_size], bits, sym)
        q = s * (torch.clamp(torch.round(W[:, i] / s) + z, 0, maxq) - z)
        Q[:, i] = q
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return Q


def layer_problem(out=24, cols=64, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 2 * mix)  # correlated inputs
    W = torch.randn(out, cols, generator=g) * 0.2
    H = 2 * X.T @ X / n
    return W, H, X


@pytest.mark.parametrize("bits,group_size,sym", [(4, -1, False), (3, -1, True), (4, 32, False), (4, 64, True)])
def test_matches_the_direct_equations_and_beats_rtn(bits, group_size, sym):
    W, H, _ = layer_problem()
    r = gptq_quantize(W, H, bits, group_size=group_size, sym=sym, block_size=32 if group_size in (-1, 32) else 64)
    Qd = direct_gptq(W, H, bits, group_size, sym)
    obj, obj_direct, obj_rtn = objective(W, r["Q"], H), objective(W, Qd, H), objective(W, rtn(W, bits, sym, group_size), H)
    # GPTQ is chaotic in rounding ties: compare the objective, not weights entry by entry
    assert abs(obj - obj_direct) <= 2e-3 * obj_direct, (obj, obj_direct)
    assert obj <= obj_rtn, (obj, obj_rtn)
    assert obj < 0.9 * obj_rtn  # and clearly better on correlated inputs
    # codes and parameters reproduce Q
    scale, zero = r["scale"], r["zero"]
    if group_size > 0:
        scale, zero = scale.repeat_interleave(group_size, 1), zero.repeat_interleave(group_size, 1)
    else:
        scale, zero = scale[:, None], zero[:, None]
    torch.testing.assert_close((r["codes"] - zero) * scale, r["Q"])
    assert r["codes"].min() >= 0 and r["codes"].max() <= 2**bits - 1


@pytest.mark.parametrize("group_size,static", [(-1, False), (16, False), (16, True)])
def test_act_order_variants_never_worse_than_rtn(group_size, static):
    W, H, _ = layer_problem(seed=1)
    H = H * torch.linspace(0.05, 3.0, H.shape[0])[None, :].sqrt() * torch.linspace(0.05, 3.0, H.shape[0])[:, None].sqrt()
    r = gptq_quantize(W, H, 4, group_size=group_size, act_order=True, static_groups=static, block_size=16)
    assert objective(W, r["Q"], H) <= objective(W, rtn(W, 4, False, group_size), H)
    if group_size > 0 and not static:  # groups contiguous in the processing order: a group index per column
        g = r["gidx"]
        assert g is not None and g.shape == (W.shape[1],)
        torch.testing.assert_close((r["codes"] - r["zero"][:, g]) * r["scale"][:, g], r["Q"])
    else:
        assert r["gidx"] is None


def test_dead_inputs_get_zero_weight():
    W, H, _ = layer_problem(seed=2)
    H[5, :] = 0
    H[:, 5] = 0
    r = gptq_quantize(W, H, 4)
    s, z = gptq_qparams(W, 4, False)  # per-channel parameters from W before the dead column is zeroed
    torch.testing.assert_close(r["scale"], s)
    assert torch.all(r["Q"][:, 5] == 0)


def test_hessian_is_the_running_mean_of_the_reference():
    lin = QuantLinear(torch.nn.Linear(6, 3), QuantSpec(bits=4, granularity="channel"), None)
    acc = HessianAccumulator(lin)
    g = torch.Generator().manual_seed(0)
    calls = [torch.randn(2, 5, 6, generator=g), torch.randn(3, 5, 6, generator=g)]
    for x in calls:
        acc.add(x)
    X = torch.cat([c.reshape(-1, 6) for c in calls])
    n = sum(c.shape[0] for c in calls)  # the reference counts sequences (the leading dim), not tokens
    torch.testing.assert_close(acc.H, 2 * X.T @ X / n, rtol=1e-5, atol=1e-6)


def test_gptq_stage1_on_a_vit_quantizes_every_layer_through_the_engine():
    torch.manual_seed(0)
    fp = make_tiny_vit()
    q = adapter_for(copy.deepcopy(fp))
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(16, 1, 8, 8, generator=g)]
    info = apply_ptq(q, get_specs("gptq", 4, 16), calib, settings={})
    lins = {n: m for n, m in q.model.named_modules() if isinstance(m, torch.nn.Module) and hasattr(m, "w_codes") and m.w_quant is not None}
    assert info["gptq_layers"] == len(lins) == 2 * 4 + 2 and info["weight_only"]
    for n, m in lins.items():
        assert m.w_codes is not None and m.in_quant is None, n  # weight-only: no activation quantizer
        assert m.w_codes.dtype == torch.uint8
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y_q = q.model(x)
        set_quant_state(q.model, False, False)
        y_off = q.model(x)
        set_quant_state(q.model, True, True)
    torch.testing.assert_close(y_off, fp(x), rtol=0, atol=0)  # the float path is the FP model
    assert not torch.allclose(y_q, y_off)
    # GPTQ's layer objective is below RTN's on the same layer and the same calibration inputs
    rtn_q = adapter_for(copy.deepcopy(fp))
    apply_ptq(rtn_q, get_specs("rtn", 4, 16), calib)
    with torch.no_grad():
        err_gptq = float((q.model(calib[0]) - fp(calib[0])).pow(2).mean())
        err_rtn = float((rtn_q.model(calib[0]) - fp(calib[0])).pow(2).mean())
    assert err_gptq < err_rtn, (err_gptq, err_rtn)
