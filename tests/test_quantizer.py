"""Property tests of the quantizer math (qwt/quant/quantizer.py) and the range estimators
(qwt/quant/observers.py)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qwt.quant.modules import Quantizer
from qwt.quant.observers import HIST_BINS, REPQ_PERCENTILES, Observer, compute_qparams, rowwise_quantile, rowwise_quantiles
from qwt.quant.quantizer import (QuantSpec, fake_quant, fake_quant_log_sqrt2, fake_quant_uniform, param_shape,
                                 qparams_from_range, quantize_codes, round_ste, to_stat_view)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
vectors = arrays(np.float32, st.integers(1, 200), elements=finite)
bits_st = st.integers(2, 8)


def _qparams(x: torch.Tensor, spec: QuantSpec):
    return qparams_from_range(x.min(), x.max(), spec)


# ----------------------------------------------------------------------------------------------
# uniform grid


@SETTINGS
@given(vectors, bits_st, st.booleans())
def test_output_lies_on_the_integer_grid(v, bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    x = torch.from_numpy(v)
    scale, zero = _qparams(x, spec)
    x_hat = fake_quant_uniform(x, scale, zero, spec.qmin, spec.qmax)
    code = x_hat.double() / scale.double() + zero.double()
    assert torch.allclose(code, code.round(), atol=1e-3, rtol=0)
    assert code.round().min() >= spec.qmin and code.round().max() <= spec.qmax
    # the zero point itself is an integer on the grid and 0.0 is exactly representable
    assert float(zero) == round(float(zero)) and spec.qmin <= float(zero) <= spec.qmax
    assert float(fake_quant_uniform(torch.zeros(1), scale, zero, spec.qmin, spec.qmax)) == 0.0


@SETTINGS
@given(vectors, bits_st, st.booleans())
def test_fake_quant_is_idempotent(v, bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    x = torch.from_numpy(v)
    scale, zero = _qparams(x, spec)
    once = fake_quant_uniform(x, scale, zero, spec.qmin, spec.qmax)
    twice = fake_quant_uniform(once, scale, zero, spec.qmin, spec.qmax)
    assert torch.equal(once, twice)


@SETTINGS
@given(vectors, bits_st, st.booleans())
def test_error_at_most_half_a_step_inside_the_range(v, bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    x = torch.from_numpy(v)
    scale, zero = _qparams(x, spec)
    s = float(scale)
    # every calibration value (they define the range, which is widened to contain 0) ...
    err = (x - fake_quant_uniform(x, scale, zero, spec.qmin, spec.qmax)).abs()
    assert float(err.max()) <= s / 2 * (1 + 1e-4) + 1e-6 * float(x.abs().max())
    # ... and a dense sweep of the grid's own range [(qmin - z) s, (qmax - z) s]
    lo, hi = (spec.qmin - float(zero)) * s, (spec.qmax - float(zero)) * s
    sweep = torch.linspace(lo, hi, 1001)
    err = (sweep - fake_quant_uniform(sweep, scale, zero, spec.qmin, spec.qmax)).abs()
    assert float(err.max()) <= s / 2 * (1 + 1e-4) + 1e-6 * max(abs(lo), abs(hi))


@SETTINGS
@given(vectors, bits_st, st.booleans(), st.floats(1.0, 1e3))
def test_values_beyond_the_range_clamp_to_the_end_points(v, bits, symmetric, k):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    x = torch.from_numpy(v)
    scale, zero = _qparams(x, spec)
    s = float(scale)
    assume(s > 1e-6)
    top = (spec.qmax - float(zero)) * s
    bottom = (spec.qmin - float(zero)) * s
    beyond = torch.tensor([top + k * s, top + 2 * k * s, bottom - k * s, bottom - 2 * k * s], dtype=torch.float32)
    out = fake_quant_uniform(beyond, scale, zero, spec.qmin, spec.qmax)
    end_hi = (spec.qmax - zero) * scale
    end_lo = (spec.qmin - zero) * scale
    assert torch.equal(out, torch.stack([end_hi, end_hi, end_lo, end_lo]).reshape(4))


def test_qparams_known_values():
    # asymmetric 4 bit over [-1, 2]: 15 steps of 0.2, zero point round(1 / 0.2) = 5
    spec = QuantSpec(bits=4)
    scale, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0), spec)
    assert math.isclose(float(scale), 0.2, rel_tol=1e-6) and float(zero) == 5.0
    # symmetric narrow range 4 bit: qmax 7, scale = amax / 7, zero 0
    sym = QuantSpec(bits=4, symmetric=True)
    assert (sym.qmin, sym.qmax) == (-7, 7) and (spec.qmin, spec.qmax) == (0, 15)
    scale, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.5), sym)
    assert math.isclose(float(scale), 0.5, rel_tol=1e-6) and float(zero) == 0.0
    # a range not containing zero is widened to contain it
    scale, zero = qparams_from_range(torch.tensor(1.0), torch.tensor(4.0), spec)
    assert math.isclose(float(scale), 4.0 / 15, rel_tol=1e-6) and float(zero) == 0.0


@SETTINGS
@given(vectors, bits_st)
def test_symmetric_grid_is_odd_and_asymmetric_grid_uses_all_codes(v, bits):
    x = torch.from_numpy(v)
    sym = QuantSpec(bits=bits, symmetric=True)
    scale, zero = _qparams(x, sym)
    assert float(zero) == 0.0
    assert torch.equal(fake_quant_uniform(-x, scale, zero, sym.qmin, sym.qmax), -fake_quant_uniform(x, scale, zero, sym.qmin, sym.qmax))
    # symmetric scale = amax / (2^(b-1) - 1)
    amax = float(x.abs().max())
    assert math.isclose(float(scale), max(amax / (2 ** (bits - 1) - 1), 1e-8), rel_tol=1e-6)
    # asymmetric: the span of the (zero-widened) data fills the 2^b - 1 steps
    asym = QuantSpec(bits=bits)
    scale, zero = _qparams(x, asym)
    span = max(float(x.max()), 0.0) - min(float(x.min()), 0.0)
    assert math.isclose(float(scale), max(span / (2**bits - 1), 1e-8), rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------
# per-channel / per-group shapes


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@SETTINGS
@given(shapes, st.data(), bits_st, st.booleans())
def test_per_channel_any_axis(shape, data, bits, symmetric):
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel", axis=axis)
    ax = axis % ndim
    expected_shape = tuple(shape[ax] if i == ax else 1 for i in range(ndim))
    assert param_shape(x.shape, spec) == expected_shape
    view = to_stat_view(x, spec)
    assert view.shape == (shape[ax], x.numel() // shape[ax])
    for c in range(shape[ax]):  # row c holds exactly the elements of channel c
        assert torch.equal(view[c].sort().values, x.select(ax, c).flatten().sort().values)

    q = Quantizer(spec)
    q.calibrate_from(x)
    assert tuple(q.scale.shape) == expected_shape and tuple(q.zero.shape) == expected_shape
    out = q(x)
    for c in range(shape[ax]):  # same as quantizing each channel on its own, per tensor
        xc = x.select(ax, c)
        s, z = _qparams(xc, spec.with_(granularity="tensor"))
        assert torch.allclose(q.scale.flatten()[c], s) and torch.equal(q.zero.flatten()[c], z)
        assert torch.allclose(out.select(ax, c), fake_quant_uniform(xc, s, z, spec.qmin, spec.qmax), atol=1e-6)


@SETTINGS
@given(st.lists(st.integers(1, 3), min_size=0, max_size=2), st.integers(1, 4), st.sampled_from([2, 4, 8]),
       bits_st, st.booleans(), st.integers(0, 2**16))
def test_per_group(lead, n_groups, g, bits, symmetric, seed):
    shape = (*lead, n_groups * g)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=g)
    assert param_shape(x.shape, spec) == (*lead, n_groups, 1)
    view = to_stat_view(x, spec)
    assert view.shape == (x.numel() // g, g)
    q = Quantizer(spec)
    q.calibrate_from(x)
    assert tuple(q.scale.shape) == (*lead, n_groups, 1)
    out = fake_quant(x, spec, q.scale, q.zero)
    assert out.shape == x.shape
    xg = x.reshape(-1, g)
    og = out.reshape(-1, g)
    for i in range(xg.shape[0]):  # each group of g consecutive last-dim elements has its own grid
        s, z = _qparams(xg[i], spec.with_(granularity="tensor"))
        assert torch.allclose(og[i], fake_quant_uniform(xg[i], s, z, spec.qmin, spec.qmax), atol=1e-6)


def test_group_size_must_divide_last_dim():
    with pytest.raises(ValueError, match="group_size"):
        to_stat_view(torch.zeros(2, 10), QuantSpec(granularity="group", group_size=4))


# ----------------------------------------------------------------------------------------------
# log-sqrt2


def _log_sqrt2_reference(x: float, delta: float, bits: int) -> float:
    if x <= 0:
        return 0.0
    q = round(-2.0 * math.log2(x / delta))
    if q >= 2**bits:
        return 0.0
    q = min(max(q, 0), 2**bits - 1)
    return delta * 2.0 ** (-math.ceil(q / 2)) * math.sqrt(2) ** (q % 2)


@SETTINGS
@given(arrays(np.float64, st.integers(1, 64), elements=st.floats(0.0, 1.0)), st.floats(1e-3, 1.0), st.integers(2, 8))
def test_log_sqrt2_matches_direct_formula(v, delta, bits):
    # skip values whose code sits on a rounding tie (float64 log2 implementations may differ by an ulp)
    for x in v:
        if x > 0:
            t = -2.0 * math.log2(x / delta)
            assume(abs(t - math.floor(t) - 0.5) > 1e-9)
    x = torch.from_numpy(v)
    out = fake_quant_log_sqrt2(x, torch.tensor(delta, dtype=torch.float64), bits)
    ref = torch.tensor([_log_sqrt2_reference(float(e), delta, bits) for e in v], dtype=torch.float64)
    assert torch.allclose(out, ref, rtol=1e-12, atol=0)


def test_log_sqrt2_known_values():
    delta, bits = 0.5, 3  # codes 0..7
    x = torch.tensor([0.0, 0.5, 1.0, 0.25, 0.5 / math.sqrt(2), 0.5 * 2**-3.5, 0.5 * 2**-4, 1e-9])
    out = fake_quant_log_sqrt2(x, delta, bits)
    # x = 0 -> 0; x = delta -> delta; x > delta -> clamps to code 0 = delta; 0.25 -> code 2;
    # delta / sqrt2 -> code 1; code 7 = delta 2^-3.5 is the last level; code 8 is past the range -> 0
    expected = torch.tensor([0.0, 0.5, 0.5, 0.25, 0.5 / math.sqrt(2), 0.5 * 2**-3.5, 0.0, 0.0])
    assert torch.allclose(out, expected, rtol=1e-6, atol=0)


def test_log_sqrt2_spec_is_per_tensor_and_dispatched_by_fake_quant():
    spec = QuantSpec(bits=4, scheme="log_sqrt2")
    x = torch.rand(3, 7).softmax(-1)
    assert torch.equal(fake_quant(x, spec, torch.tensor(0.3), torch.tensor(0.0)), fake_quant_log_sqrt2(x, torch.tensor(0.3), 4))
    with pytest.raises(ValueError, match="per-tensor"):
        QuantSpec(scheme="log_sqrt2", granularity="channel")


# ----------------------------------------------------------------------------------------------
# straight-through estimator


@SETTINGS
@given(arrays(np.float32, st.integers(1, 50), elements=st.floats(-50, 50, width=32)))
def test_round_ste_forward_rounds_backward_passes_gradient_one(v):
    x = torch.from_numpy(v).requires_grad_(True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_fake_quant_ste_gradient_is_one_inside_zero_outside():
    spec = QuantSpec(bits=4)
    scale, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), spec)
    x = torch.tensor([-0.9, -0.33, 0.0, 0.41, 0.77, 5.0, -5.0], requires_grad=True)
    fake_quant_uniform(x, scale, zero, spec.qmin, spec.qmax, ste=True).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1, 1, 1, 1, 0, 0]))
    # without STE, rounding kills the gradient
    x2 = x.detach().clone().requires_grad_(True)
    fake_quant_uniform(x2, scale, zero, spec.qmin, spec.qmax, ste=False).sum().backward()
    assert float(x2.grad.abs().sum()) == 0.0


# ----------------------------------------------------------------------------------------------
# range estimators


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 300), st.integers(0, 2**16))
def test_rowwise_quantiles_match_torch_quantile(rows, n, seed):
    v = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    qs = [0.0, 1e-5, 0.001, 0.5, 0.999, 0.99999, 1.0]
    got = rowwise_quantiles(v, qs)
    for q, g in zip(qs, got):
        ref = torch.quantile(v, q, dim=-1)
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rowwise_quantile(v, q), ref, rtol=1e-12, atol=1e-12)


def _l2(x, spec, scale, zero):
    return float((x - fake_quant_uniform(x, scale, zero, spec.qmin, spec.qmax)).pow(2).sum())


def test_minmax_range():
    x = torch.tensor([[-2.0, 0.5, 1.0, 4.0]])
    spec = QuantSpec(bits=8, estimator="minmax")
    scale, zero = compute_qparams(x, spec)
    assert math.isclose(float(scale), 6.0 / 255, rel_tol=1e-6)
    assert float(zero) == round(2.0 / (6.0 / 255))
    # streamed over several updates = one shot over the concatenation
    data = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)).mul(3)
    obs = Observer(spec)
    for chunk in data.unbind(0):
        obs.update(chunk)
    s_stream, z_stream = obs.compute()
    s_one, z_one = qparams_from_range(data.min(), data.max(), spec)
    assert torch.equal(s_stream, s_one) and torch.equal(z_stream, z_one)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentile_search_never_worse_than_the_best_candidate(bits, seed):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed data, where clipping the outliers pays off
    x = torch.distributions.StudentT(2.0).sample((20000,)) if seed else torch.randn(20000, generator=g)
    if seed:
        x = x + 0.3 * seed
    spec = QuantSpec(bits=bits, estimator="percentile_search")
    scale, zero = compute_qparams(x[None], spec)
    got = _l2(x, spec, scale[0], zero[0])
    best = None
    for p in REPQ_PERCENTILES:
        lo, hi = torch.quantile(x.double(), 1 - p).float(), torch.quantile(x.double(), p).float()
        s, z = qparams_from_range(lo, hi, spec)
        e = _l2(x, spec, s, z)
        best = e if best is None else min(best, e)
    assert got <= best * (1 + 1e-5)
    # the chosen range is one of the candidates, so at most the 0.99999 quantile, well inside min / max
    assert float(scale[0]) <= float((x.max() - x.min()) / spec.qmax) * (1 + 1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_estimator_never_worse_than_minmax(bits):
    x = torch.distributions.Laplace(0.0, 1.0).sample((5000,))
    spec = QuantSpec(bits=bits, estimator="mse")
    scale, zero = compute_qparams(x[None], spec)
    s_mm, z_mm = qparams_from_range(x.min(), x.max(), spec)
    assert _l2(x, spec, scale[0], zero[0]) <= _l2(x, spec, s_mm, z_mm)
    # on heavy-tailed data at low bits the search clips (strictly smaller step than minmax)
    assert float(scale[0]) < float(s_mm)


def test_hist_percentile_amax_close_to_true_percentile():
    x = torch.randn(200000) * 2.0
    spec = QuantSpec(bits=8, symmetric=True, estimator="hist_percentile", percentile=99.99)
    scale, zero = compute_qparams(x[None], spec)
    amax = float(scale[0]) * spec.qmax
    true = float(torch.quantile(x.abs().double(), 0.9999))
    bin_width = float(x.abs().max()) / HIST_BINS
    assert float(zero[0]) == 0.0
    assert true - bin_width <= amax <= true + 2 * bin_width
    assert amax < float(x.abs().max())  # it does clip the extreme tail
    with pytest.raises(ValueError, match="symmetric"):
        compute_qparams(x[None], QuantSpec(estimator="hist_percentile", symmetric=False))


def test_log_sqrt2_delta_search_picks_a_candidate_with_low_error():
    attn = torch.randn(64, 50).mul(3).softmax(-1).flatten()
    spec = QuantSpec(bits=4, scheme="log_sqrt2", estimator="percentile_search")
    delta, zero = compute_qparams(attn[None], spec)
    errs = {p: float((attn - fake_quant_log_sqrt2(attn, torch.quantile(attn, p), 4)).pow(2).sum()) for p in REPQ_PERCENTILES}
    got = float((attn - fake_quant_log_sqrt2(attn, delta[0], 4)).pow(2).sum())
    assert float(zero[0]) == 0.0
    assert got <= min(errs.values()) * (1 + 1e-4)


def test_quantize_codes_are_integers_in_range():
    spec = QuantSpec(bits=4)
    x = torch.randn(100) * 4
    scale, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), spec)
    codes = quantize_codes(x, scale, zero, spec.qmin, spec.qmax)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15
    assert torch.allclose((codes - zero) * scale, fake_quant_uniform(x, scale, zero, spec.qmin, spec.qmax))


# ----------------------------------------------------------------------------------------------
# spec validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 0},
        {"bits": 17},
        {"bits": -4},
        {"granularity": "row"},
        {"scheme": "log2"},
        {"estimator": "kl"},
        {"scheme": "log_sqrt2", "granularity": "channel"},
        {"scheme": "log_sqrt2", "granularity": "group"},
    ],
)
def test_invalid_spec_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


def test_with_revalidates_and_spec_is_frozen():
    spec = QuantSpec(bits=4)
    assert spec.with_(bits=6).bits == 6 and spec.bits == 4
    with pytest.raises(ValueError):
        spec.with_(bits=0)
    with pytest.raises(Exception):
        spec.bits = 3  # frozen dataclass


# ----------------------------------------------------------------------------------------------
# the Quantizer module


def test_quantizer_scale_stays_a_buffer_after_lsq_training():
    q = Quantizer(QuantSpec(bits=4))
    q.calibrate_from(torch.randn(100))
    assert set(q.state_dict()) == {"scale", "zero"} and not list(q.parameters())
    q.make_scale_trainable()
    assert [n for n, _ in q.named_parameters()] == ["scale"] and q.lsq and q.ste
    x = torch.randn(50)
    q(x).sum().backward()
    assert q.scale.grad is not None
    new_scale = q.scale.detach() * 1.5
    q.set_params(new_scale, q.zero)  # end of training: back to a fixed step size
    assert not list(q.parameters()) and not q.lsq
    assert set(dict(q.named_buffers())) == {"scale", "zero"}
    assert set(q.state_dict()) == {"scale", "zero"}  # saved with the model, moved by .to(device)
    torch.testing.assert_close(q.state_dict()["scale"], new_scale)
    q2 = Quantizer(QuantSpec(bits=4))
    q2.calibrate_from(torch.randn(100))
    q2.load_state_dict(q.state_dict())
    torch.testing.assert_close(q2(x), q(x))


def test_quantizer_observes_then_quantizes():
    q = Quantizer(QuantSpec(bits=3, estimator="minmax"))
    with pytest.raises(RuntimeError, match="not calibrated"):
        q(torch.randn(4))
    q.start_observing()
    a, b = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 0.0])
    assert torch.equal(q(a), a) and torch.equal(q(b), b)  # passes values through while observing
    q.finish_observing()
    assert math.isclose(float(q.scale), 3.0 / 7, rel_tol=1e-6)
    x = torch.linspace(-3, 3, 31)
    assert torch.equal(q(x), fake_quant_uniform(x, q.scale, q.zero, 0, 7))


# ----------------------------------------------------------------------------------------------
# dynamic per-token (group) activation quantization and group-wise weights in a layer


def _dynamic_reference(row: torch.Tensor, bits: int) -> torch.Tensor:
    """Q-DiT's rule for one group, written out: range [min, max] (0 not forced in),
    scale = max(max - min, 1e-5) / qmax, zero = clamp(round(-min / scale), 0, qmax)."""
    qmax = 2**bits - 1
    lo, hi = float(row.min()), float(row.max())
    scale = max(hi - lo, 1e-5) / qmax
    zero = min(max(round(-lo / scale), 0), qmax)
    q = torch.clamp(torch.round(row.double() / scale) + zero, 0, qmax)
    return (q - zero) * scale


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 5), st.sampled_from([4, 8, 16]), st.integers(1, 3), st.sampled_from([4, 8]),
       st.floats(-3.0, 3.0), st.integers(0, 2**16))
def test_dynamic_token_groups_each_get_their_own_grid(batch, tokens, g, n_groups, bits, shift, seed):
    x = torch.randn(batch, tokens, n_groups * g, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift
    spec = QuantSpec(bits=bits, dynamic=True, granularity="group", group_size=g)
    q = Quantizer(spec)
    assert q.calibrated  # nothing to calibrate
    out = q(x)
    xs, os_ = x.reshape(-1, g), out.reshape(-1, g)
    for i in range(xs.shape[0]):
        torch.testing.assert_close(os_[i], _dynamic_reference(xs[i], bits), rtol=0, atol=1e-9)
    # per forward: a scaled input gets scaled outputs (the grid follows the data)
    torch.testing.assert_close(q(2 * x), 2 * out, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(st.integers(1, 4), st.integers(2, 40), st.sampled_from([3, 4, 8]), st.integers(0, 2**16))
def test_dynamic_per_token_equals_one_group_of_the_whole_row(tokens, d, bits, seed):
    x = torch.randn(2, tokens, d, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    tok = Quantizer(QuantSpec(bits=bits, dynamic=True, granularity="token"))(x)
    grp = Quantizer(QuantSpec(bits=bits, dynamic=True, granularity="group", group_size=d))(x)
    assert torch.equal(tok, grp)
    # a token whose range contains 0 is quantized within half a step of its own grid
    xs, ts = x.reshape(-1, d), tok.reshape(-1, d)
    for i in range(xs.shape[0]):
        if xs[i].min() <= 0 <= xs[i].max():
            step = max(float(xs[i].max() - xs[i].min()), 1e-5) / (2**bits - 1)
            assert float((xs[i] - ts[i]).abs().max()) <= step / 2 + 1e-5


def test_dynamic_range_is_not_widened_to_zero_and_spec_is_validated():
    # the step comes from [min, max] only (not [0, max]): 15 steps over [-0.5, 1.0] at 4 bits
    x = torch.linspace(-0.5, 1.0, 16)[None]
    out = Quantizer(QuantSpec(bits=4, dynamic=True, granularity="token"))(x)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    # Q-DiT's zero-point is clamped to the code range: a group entirely above 0 gets zero = 0, so its
    # grid is [0, max - min] and larger values saturate (what the reference computes)
    y = torch.linspace(5.0, 6.0, 16)[None]
    torch.testing.assert_close(Quantizer(QuantSpec(bits=4, dynamic=True, granularity="token"))(y), torch.ones_like(y))
    with pytest.raises(ValueError, match="dynamic"):
        QuantSpec(dynamic=True, symmetric=True, granularity="token")
    with pytest.raises(ValueError, match="dynamic"):
        QuantSpec(dynamic=True, granularity="channel")
    with pytest.raises(RuntimeError, match="dynamic"):
        Quantizer(QuantSpec(dynamic=True, granularity="token")).make_scale_trainable()


@SETTINGS
@given(st.sampled_from([2, 4, 8]), st.integers(1, 4), st.integers(1, 5), bits_st, st.integers(0, 2**16))
def test_group_wise_weights_in_a_linear_layer(g, n_groups, out, bits, seed):
    from qwt.quant.modules import QuantLinear

    lin = torch.nn.Linear(g * n_groups, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(seed)))
    spec = QuantSpec(bits=bits, granularity="group", group_size=g)
    q = QuantLinear(lin, spec, None)
    q.calibrate_weight()
    w_hat = q.quant_weight()
    wg, qg = lin.weight.detach().reshape(-1, g), w_hat.detach().reshape(-1, g)
    for i in range(wg.shape[0]):  # every group of g input columns of every row: its own grid
        s, z = _qparams(wg[i], spec.with_(granularity="tensor"))
        torch.testing.assert_close(qg[i], fake_quant_uniform(wg[i], s, z, spec.qmin, spec.qmax))
    q.freeze_weight_codes()  # deployment form: integer codes in a small dtype, same weights
    assert q.w_codes.dtype in (torch.uint8, torch.int8) and torch.equal(q.quant_weight(), w_hat)
