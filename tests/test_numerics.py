"""The numerics profile (configs/numerics/): each behaviour of the official RepQ-ViT + QwT code as
an option, tested for its math; and, with every reference behaviour on, our pipeline computes
exactly what a direct re-implementation of the official code's algorithm computes."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from conftest import ROOT, make_tiny_vit
from qwt.compensation import CompContext, apply_variant, method_settings
from qwt.compensation.lstsq import ReferenceInverseSolve, StreamingLeastSquares
from qwt.models import adapter_for
from qwt.ptq import NUMERICS_DEFAULT, apply_ptq, get_specs
from qwt.ptq.common import NUMERICS_KEYS, calibrate_activations
from qwt.quant import QuantLinear, QuantSpec, quantize_model, set_quant_state
from qwt.quant.modules import Quantizer
from qwt.quant.observers import torch_quantiles
from qwt.quant.patch import LayerQuant
from qwt.quant.quantizer import fake_quant_log_sqrt2, qparams_from_range

PROFILES = {n: yaml.safe_load((ROOT / "configs" / "numerics" / f"{n}.yaml").read_text()) for n in ("default", "reference", "ours")}


def test_profiles_cover_every_behaviour_and_the_default_is_as_stated():
    for name, prof in PROFILES.items():
        assert set(prof) == NUMERICS_KEYS, name
    assert PROFILES["default"] == NUMERICS_DEFAULT  # the library default (no Hydra) is the same profile
    ref, ours, d = PROFILES["reference"], PROFILES["ours"], PROFILES["default"]
    assert all(ref[k] != ours[k] for k in NUMERICS_KEYS - {"name"})
    # default: the reference for 1 (calibration path), 2 (zero-point), 9 (branch), 10 (edge layers); ours elsewhere
    for k in ("calibration_path", "reparam_zero", "branch_precision", "edge_layers"):
        assert d[k] == ref[k], k
    for k in ("quantile", "attention_scale", "reparam_bias", "log_zero", "uniform_range", "solver"):
        assert d[k] == ours[k], k


# ---------------------------------------------------------------------------------------------
# each behaviour's math


def test_quantized_path_calibration_sees_the_quantized_upstream():
    """path=quantized: quantizer k is initialised from inputs that passed quantizers 0..k-1 (and the
    quantized weights); path=float: from the float activations."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(64, 8) * 2
    spec_w, spec_a = QuantSpec(bits=3, granularity="channel", axis=0), QuantSpec(bits=3)

    class A(adapter_for.__globals__["ModelAdapter"]):
        def stem(self, b):
            return adapter_for.__globals__["State"](b)

        def units(self):
            return []

        def head(self, s):
            return self.model(s.h)

    results = {}
    for path in ("quantized", "float"):
        m = copy.deepcopy(net)
        quantize_model(m, lambda n, mod: LayerQuant(weight=spec_w, act=spec_a) if isinstance(mod, nn.Linear) else None)
        for mod in m:
            if isinstance(mod, QuantLinear):
                mod.calibrate_weight()
        calibrate_activations(A(m), [x], path=path)
        results[path] = m
    q, f = results["quantized"], results["float"]
    with torch.no_grad():
        # expected ranges of the last quantizer: from its input along the quantized chain / float chain
        set_quant_state(q, True, True)
        h_q = q[3](q[2](q[1](q[0](x))))
        h_f = net[3](net[2](net[1](net[0](x))))
    for qz, h in ((q[4].in_quant, h_q), (f[4].in_quant, h_f)):
        ref = Quantizer(spec_a)
        ref.calibrate_from(h)
        torch.testing.assert_close(qz.scale, ref.scale, rtol=0, atol=0)
        torch.testing.assert_close(qz.zero, ref.zero, rtol=0, atol=0)
    assert not torch.equal(q[4].in_quant.scale, f[4].in_quant.scale)


def test_float_zero_point_round_trip():
    """reparam_zero=float keeps z~ = mean z_c unrounded; a uniform quantizer with a float zero-point
    computes (clamp(round(x / d) + z, 0, 2^b - 1) - z) d exactly (its grid is shifted by frac(z))."""
    spec = QuantSpec(bits=4)
    q = Quantizer(spec)
    d, z = torch.tensor(0.1), torch.tensor(7.375)
    q.set_params(d, z)
    x = torch.linspace(-1.2, 1.2, 97)
    ref = (torch.clamp(torch.round(x / d) + z, 0, 15) - z) * d
    assert torch.equal(q(x), ref)
    # inside the range the zero-point cancels (levels are multiples of d); the clip levels are
    # -z d and (15 - z) d, which a float zero-point moves off the grid
    assert float(q(x).min()) == pytest.approx(float(-z * d)) and float(q(x).max()) == pytest.approx(float((15 - z) * d))


def test_torch_quantile_mode_is_torch_quantile_and_numpy_beyond_its_limit(monkeypatch):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 1001, generator=g)
    qs = [0.001, 0.999, 1.0 - 0.99999]
    for a, q in zip(torch_quantiles(v, qs), qs):
        assert torch.equal(a, torch.quantile(v, q, dim=-1))
    from qwt.quant import observers

    monkeypatch.setattr(observers, "TORCH_QUANTILE_LIMIT", 500)  # rows "too large": numpy's percentile
    for a, q in zip(observers.torch_quantiles(v, qs), qs):
        ref = torch.tensor([np.percentile(r.numpy(), q * 100) for r in v], dtype=torch.float32)
        assert torch.equal(a, ref)


def test_uniform_range_reference_is_not_widened_and_zero_not_clamped():
    lo, hi = torch.tensor(5.0), torch.tensor(6.0)
    s_ours, z_ours = qparams_from_range(lo, hi, QuantSpec(bits=4))
    s_ref, z_ref = qparams_from_range(lo, hi, QuantSpec(bits=4, zero_in_range=False, clamp_zero=False))
    assert float(s_ours) == pytest.approx(6 / 15) and float(z_ours) == 0.0
    assert float(s_ref) == pytest.approx(1 / 15) and float(z_ref) == -75.0  # outside the code range
    x = torch.linspace(5, 6, 16)
    q = Quantizer(QuantSpec(bits=4, zero_in_range=False, clamp_zero=False))
    q.set_params(s_ref, z_ref)
    torch.testing.assert_close(q(x), x, rtol=0, atol=1e-5)  # the reference grid covers [5, 6]


@pytest.mark.parametrize("bits,expect_zero", [(4, True), (8, False)])
def test_log_floor_at_zero(bits, expect_zero):
    delta = torch.tensor(0.5)
    out_ours = fake_quant_log_sqrt2(torch.tensor([0.0]), delta, bits)
    out_ref = fake_quant_log_sqrt2(torch.tensor([0.0]), delta, bits, floor=1e-6)
    assert float(out_ours) == 0.0
    code = round(-2 * math.log2(1e-6))  # 40: past 4-bit codes (-> 0), a real 8-bit level
    expected = 0.0 if expect_zero else 0.5 * 2.0 ** (-math.ceil(code / 2)) * math.sqrt(2) ** (code % 2)
    assert float(out_ref) == pytest.approx(expected, rel=1e-6)


def test_attention_scale_after_feeds_unscaled_q_to_the_quantizer():
    fp = make_tiny_vit(depth=1)
    calib = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))]
    seen = {}
    for where in ("before", "after"):
        q = adapter_for(copy.deepcopy(fp))
        apply_ptq(q, get_specs("rtn", 8, 8, numerics={**NUMERICS_DEFAULT, "attention_scale": where}), calib)
        attn = q.model.blocks[0].attn
        def keep(m, args, where=where):
            seen.setdefault(where, args[0].detach().clone())

        h = attn.matmul1.register_forward_pre_hook(keep)
        with torch.no_grad(), torch.autograd.grad_mode.no_grad():
            set_quant_state(q.model, False, False)
            y = q.model(calib[0])
        h.remove()
        torch.testing.assert_close(y, fp(calib[0]), rtol=1e-5, atol=1e-5)  # the float path is the FP model either way
    torch.testing.assert_close(seen["before"], seen["after"] * fp.blocks[0].attn.scale, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("order", ["ours", "reference"])
def test_both_bias_fold_orders_are_exact_identities(order):
    from qwt.ptq.repq_vit import fold_channel_affine

    fp = make_tiny_vit(depth=1)
    a = adapter_for(copy.deepcopy(fp))
    with torch.no_grad():
        for m in a.model.modules():
            if isinstance(m, nn.LayerNorm):
                m.bias.normal_()
    ref_model = copy.deepcopy(a.model)
    g = torch.Generator().manual_seed(2)
    r, beta = torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g)
    w0 = a.get("blocks.0.attn.qkv").weight.detach().clone()
    b0 = a.get("blocks.0.attn.qkv").bias.detach().clone()
    with torch.no_grad():
        fold_channel_affine(a, "blocks.0.norm1", [a.get("blocks.0.attn.qkv")], r, beta, bias_order=order)
        x = torch.randn(4, 1, 8, 8)
        torch.testing.assert_close(a.model(x), ref_model(x), rtol=1e-5, atol=1e-5)
        if order == "reference":  # W scaled first, then (W r) beta
            expected = b0 + torch.mm(w0 * r, beta.reshape(-1, 1)).reshape(-1)
        else:
            expected = b0 + w0 @ (r * beta)
        assert torch.equal(a.get("blocks.0.attn.qkv").bias.detach(), expected)


def test_inverse_solver_is_the_reference_formula_and_fails_where_it_fails():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, 6, generator=g) + 1
    R = X @ torch.randn(6, 3, generator=g) + 0.1 * torch.randn(300, 3, generator=g)
    s = ReferenceInverseSolve(6, 3)
    s.update(X, R)
    s.all_reduce()
    W, b = s.solve()
    X1 = torch.cat([X, torch.ones(300, 1)], 1)
    theta = torch.inverse(X1.t() @ X1) @ X1.t() @ R
    assert torch.equal(W[0].float(), theta[:-1]) and torch.equal(b[0].float(), theta[-1])
    pred = X @ theta[:-1] + theta[-1]
    assert s.r2(W, b) == pytest.approx(1 - float(((R - pred) ** 2).sum()) / float(((R - R.mean(0)) ** 2).sum()), rel=1e-6)
    # a rank-deficient X (a constant column duplicates the intercept, as after a LayerNorm-free stem):
    # the float32 inverse gives garbage and the R^2 gate switches the block off; the Cholesky solve fits
    Xs = torch.cat([X, torch.full((300, 1), 2.0)], 1)
    inv, chol = ReferenceInverseSolve(7, 3), StreamingLeastSquares(7, 3)
    inv.update(Xs, R)
    chol.update(Xs, R)
    inv.all_reduce()
    Wi, bi = inv.solve()
    Wc, bc = chol.solve(1e-6)
    r2_inv, r2_chol = inv.r2(Wi, bi), chol.r2(Wc, bc)
    assert r2_chol > 0.9
    assert not (r2_inv > 0.9 and torch.isfinite(Wi).all()) or r2_inv < r2_chol


# ---------------------------------------------------------------------------------------------
# the official algorithm, re-implemented directly, against numerics=reference


class _RefUniform:
    """The official UniformQuantizer: lazily initialised by a percentile search on its first input
    (channel by channel for channel-wise), then x_hat = (clamp(round(x/d) + z, 0, 2^b-1) - z) d."""

    def __init__(self, bits, channel_wise):
        self.bits, self.cw, self.delta, self.zero = bits, channel_wise, None, None

    def _init_tensor(self, x):
        best, out = 1e10, None
        for pct in (0.999, 0.9999, 0.99999):
            hi, lo = torch.quantile(x.reshape(-1), pct), torch.quantile(x.reshape(-1), 1.0 - pct)
            d = (hi - lo) / (2**self.bits - 1)
            z = (-lo / d).round()
            xq = (torch.clamp(torch.round(x / d) + z, 0, 2**self.bits - 1) - z) * d
            score = (x - xq).abs().pow(2).mean()
            if score < best:
                best, out = score, (d, z)
        return out

    def __call__(self, x):
        if self.delta is None:
            if self.cw:
                chans = [x[:, :, c] if x.dim() == 3 else x[c] for c in range(x.shape[-1] if x.dim() == 3 else x.shape[0])]
                dz = [self._init_tensor(c) for c in chans]
                shape = [1, 1, -1] if x.dim() == 3 else [-1] + [1] * (x.dim() - 1)
                self.delta = torch.stack([d for d, _ in dz]).view(shape)
                self.zero = torch.stack([z for _, z in dz]).view(shape)
            else:
                self.delta, self.zero = self._init_tensor(x)
        return (torch.clamp(torch.round(x / self.delta) + self.zero, 0, 2**self.bits - 1) - self.zero) * self.delta


class _RefLog:
    def __init__(self, bits):
        self.bits, self.delta = bits, None

    def _q(self, x, d):
        code = torch.round(-1 * torch.log2(torch.clamp(x / d, min=1e-6)) * 2)
        mask = code >= 2**self.bits
        code = torch.clamp(code, 0, 2**self.bits - 1)
        out = 2 ** (-1 * torch.ceil(code / 2)) * ((code % 2) * (math.sqrt(2) - 1) + 1) * d
        out[mask] = 0
        return out

    def __call__(self, x):
        if self.delta is None:
            best = 1e10
            for pct in (0.999, 0.9999, 0.99999):
                d = torch.quantile(x.reshape(-1), pct)
                score = (x - self._q(x, d)).abs().pow(2).mean()
                if score < best:
                    best, self.delta = score, d
        return self._q(x, self.delta)


class _RefLinear(nn.Module):
    def __init__(self, m, w_bits, a_bits, channel_wise_input):
        super().__init__()
        self.m = m
        self.iq = _RefUniform(8 if isinstance(m, nn.Conv2d) else a_bits, channel_wise_input)
        self.wq = _RefUniform(w_bits, True)

    def forward(self, x):
        w = self.wq(self.m.weight)
        x = self.iq(x)
        if isinstance(self.m, nn.Conv2d):
            return F.conv2d(x, w, self.m.bias, self.m.stride, self.m.padding)
        return F.linear(x, w, self.m.bias)


class _RefMatMul(nn.Module):
    def __init__(self, a_bits, log_first):
        super().__init__()
        self.qa = _RefLog(a_bits) if log_first else _RefUniform(a_bits, False)
        self.qb = _RefUniform(a_bits, False)

    def forward(self, a, b):
        return self.qa(a) @ self.qb(b)


def _ref_attention_forward(self, x, attn_mask=None, is_causal=False):
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = self.ref_mm1(q, k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    x = self.ref_mm2(attn, v).transpose(1, 2).reshape(B, N, C)
    return self.proj(x)


def reference_repq_vit(fp, calib, w_bits, a_bits):
    """The official RepQ-ViT quantization of a timm ViT, step by step: patch every Conv2d / Linear
    (qkv and fc1 inputs channel-wise, the conv input 8-bit), attention matmuls (log-sqrt2 for the
    softmax), one calibration forward with quantization on, the scale reparameterization (float
    mean zero-point; W scaled by r first), weight quantizers re-initialised."""
    model = copy.deepcopy(fp)
    for name, m in list(model.named_modules()):
        for cname, c in list(m.named_children()):
            if isinstance(c, (nn.Linear, nn.Conv2d)):
                setattr(m, cname, _RefLinear(c, w_bits, a_bits, cname in ("qkv", "fc1")))
    for blk in model.blocks:
        a = blk.attn
        a.ref_mm1, a.ref_mm2 = _RefMatMul(a_bits, False), _RefMatMul(a_bits, True)
        a.forward = _ref_attention_forward.__get__(a)
    with torch.no_grad():
        model(calib)
        for blk in model.blocks:
            for norm, nxt in ((blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)):
                d, z = nxt.iq.delta.reshape(-1), nxt.iq.zero.reshape(-1)
                dt, zt = torch.mean(d), torch.mean(z)
                r = d / dt
                b = (-z * d) / r - (-zt * dt)
                norm.weight.data = norm.weight.data / r
                norm.bias.data = norm.bias.data / r - b
                nxt.m.weight.data = nxt.m.weight.data * r
                nxt.m.bias.data = nxt.m.bias.data + torch.mm(nxt.m.weight.data, b.reshape(-1, 1)).reshape(-1)
                nxt.iq.cw, nxt.iq.delta, nxt.iq.zero = False, dt, zt
                nxt.wq.delta = None  # re-initialised from the folded weight at the next forward
        model(calib)
    return model


def _randomized_vit():
    fp = make_tiny_vit(depth=2, dim=32, heads=4)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in fp.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.3, 2.0, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return fp


def test_reference_profile_reproduces_the_official_algorithm_exactly():
    fp = _randomized_vit()
    g = torch.Generator().manual_seed(5)
    calib = torch.randn(32, 1, 8, 8, generator=g)
    test_x = torch.randn(16, 1, 8, 8, generator=g)
    ref = reference_repq_vit(fp, calib, 4, 4)
    ours = adapter_for(copy.deepcopy(fp))
    apply_ptq(ours, get_specs("repq_vit", 4, 4, numerics=PROFILES["reference"]), [calib])
    with torch.no_grad():
        y_ref, y_ours = ref(test_x), ours.model(test_x)
    assert float((y_ref - fp(test_x)).norm()) > 0.01 * float(fp(test_x).norm())  # W4A4 does change the model
    torch.testing.assert_close(y_ours, y_ref, rtol=0, atol=0)
    # and the project's arithmetic is a different model (the profile matters)
    other = adapter_for(copy.deepcopy(fp))
    apply_ptq(other, get_specs("repq_vit", 4, 4, numerics=PROFILES["ours"]), [calib])
    with torch.no_grad():
        assert not torch.equal(other.model(test_x), y_ref)


def test_reference_profile_qwt_fits_the_reference_regression():
    """QwT with solver=inverse on the reference-quantized model: block by block, the branch is the
    float32 inverse solution on the quantized chain's input (the reference's regression)."""
    fp = _randomized_vit()
    g = torch.Generator().manual_seed(6)
    calib = torch.randn(32, 1, 8, 8, generator=g)
    q = adapter_for(copy.deepcopy(fp))
    apply_ptq(q, get_specs("repq_vit", 4, 4, numerics=PROFILES["reference"]), [calib])
    settings = method_settings("reference")
    settings["qwt"].update(num_samples=32, batch_size=32)
    comp = q.clone()
    info = apply_variant(CompContext(comp, adapter_for(fp), lambda n, t, bs, shard=False: [calib], None, "cpu"), "qwt", settings)["qwt"]
    assert info["solver"] == "inverse" and info["branch_precision"] == "fp16_eval"
    with torch.no_grad():  # direct: the reference's loop over blocks, float32 inverse with a ones column
        set_quant_state(q.model, True, True)
        h = q.stem(calib).h
        for k, blk in enumerate(q.model.blocks):
            set_quant_state(blk, False, False)
            y_fp = blk(h)
            set_quant_state(blk, True, True)
            y_q = blk(h)
            X = h.reshape(-1, h.shape[-1])
            X1 = torch.cat([X, torch.ones(X.shape[0], 1)], dim=-1)
            theta = torch.inverse(X1.t() @ X1) @ X1.t() @ (y_fp - y_q).reshape(-1, h.shape[-1])
            cb = comp.get(f"blocks.{k}")
            if info["r2"][k] > 0:
                torch.testing.assert_close(cb.branch.weight, theta[:-1].t().contiguous(), rtol=0, atol=0)
                torch.testing.assert_close(cb.branch.bias, theta[-1], rtol=0, atol=0)
                h = y_q + X.reshape(h.shape) @ theta[:-1] + theta[-1]  # fitting runs the float32 branch
            else:
                h = y_q
