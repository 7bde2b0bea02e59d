"""QwT-v2 / CWAC (qwt/compensation/qwt_v2.py): per-channel affine post-compensation, fitted in
execution order, folded into the weight scales and biases at zero cost."""
import copy

import pytest
import torch

from conftest import make_tiny_vit
from qwt.compensation import CompContext, apply_variant, extra_params, method_settings
from qwt.compensation.qwt_v2 import ChannelStats, fit_layer, fold_affine, fold_all
from qwt.engine import LayerwiseEngine
from qwt.models import adapter_for
from qwt.ptq import apply_ptq, get_specs
from qwt.quant import set_quant_state
from qwt.quant.modules import _QuantWeighted

SHAPE = (1, 8, 8)
N_CALIB, BATCH = 32, 16  # two batches: statistics are streamed


def settings(**overrides):
    s = method_settings()
    s["qwt_star"]["qwt"] = s["qwt"]
    s["qwt_v2"].update(num_samples=N_CALIB, batch_size=BATCH)
    s["qwt_v2"].update(overrides)
    return s


def random_calib(n, transform, batch_size, shard=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *SHAPE, generator=g)
    return [x[i:i + batch_size] for i in range(0, n, batch_size)]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def rel(a, b):
    return float((a - b).norm() / b.norm())


def compensate(q_adapter, fp_adapter, **overrides):
    adapter = q_adapter.clone()
    info = apply_variant(CompContext(adapter, fp_adapter, random_calib, None, "cpu"), "qwt_v2", settings(**overrides))["qwt_v2"]
    return adapter, info


def stage1(method="rtn", bits=(4, 4)):
    torch.manual_seed(0)
    fp = make_tiny_vit()
    q = adapter_for(copy.deepcopy(fp))
    apply_ptq(q, get_specs(method, *bits), random_calib(16, "train", 16))
    return adapter_for(fp), q


@pytest.fixture(scope="module")
def case():
    fp_adapter, q_adapter = stage1()
    folded, info_f = compensate(q_adapter, fp_adapter, fold=True)
    unfolded, info_u = compensate(q_adapter, fp_adapter, fold=False)
    return fp_adapter, q_adapter, folded, info_f, unfolded, info_u


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantWeighted)]


TEST_X = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(42))


def test_every_layer_is_compensated(case):
    _, _, folded, info_f, unfolded, info_u = case
    n_layers = len(layers(folded.model))
    assert n_layers == 2 * 4 + 2  # patch_embed.proj, 4 Linears per block, head
    assert info_f == {"layers_folded": n_layers, "layers_unfolded": 0, "target": "global"}
    assert info_u == {"layers_folded": 0, "layers_unfolded": n_layers, "target": "global"}
    for _, m in layers(unfolded.model):
        assert m.out_gamma is not None and m.out_beta is not None
    for _, m in layers(folded.model):
        assert m.out_gamma is None and m.w_codes is not None


def test_folded_equals_unfolded(case):
    _, q, folded, _, unfolded, _ = case
    with torch.no_grad():
        y_f, y_u, y_q = folded.model(TEST_X), unfolded.model(TEST_X), q.model(TEST_X)
    assert rel(y_f, y_u) <= 1e-5
    assert rel(y_u, y_q) > 1e-3  # the compensation does change the model


def test_folded_model_adds_no_parameters(case):
    _, q, folded, _, unfolded, _ = case
    assert n_params(folded.model) == n_params(q.model)
    assert extra_params(folded.model) == 0
    channels = sum(m.out_features if hasattr(m, "out_features") else m.out_channels for _, m in layers(unfolded.model))
    assert extra_params(unfolded.model) == 2 * channels
    assert n_params(unfolded.model) == n_params(q.model) + 2 * channels


def test_fold_all_reproduces_the_folded_model(case):
    _, q, folded, _, unfolded, _ = case
    refolded = unfolded.clone()
    assert fold_all(refolded.model) == len(layers(refolded.model))
    assert extra_params(refolded.model) == 0 and n_params(refolded.model) == n_params(q.model)
    with torch.no_grad():
        y_r, y_f, y_u = refolded.model(TEST_X), folded.model(TEST_X), unfolded.model(TEST_X)
    assert rel(y_r, y_f) <= 1e-5 and rel(y_r, y_u) <= 1e-5
    for (n, a), (_, b) in zip(layers(refolded.model), layers(folded.model)):
        assert a.out_gamma is None
        torch.testing.assert_close(a.w_quant.scale, b.w_quant.scale, rtol=1e-5, atol=0, msg=n)
        torch.testing.assert_close(a.w_codes, b.w_codes, rtol=0, atol=0, msg=n)
    assert fold_all(refolded.model) == 0  # nothing left to fold


def test_quantization_off_is_still_the_float_model(case):
    fp, _, folded, _, unfolded, _ = case
    with torch.no_grad():
        y_fp = fp.model(TEST_X)
        for comp in (folded, unfolded):
            set_quant_state(comp.model, False, False)
            try:
                y = comp.model(TEST_X)
            finally:
                set_quant_state(comp.model, True, True)
            torch.testing.assert_close(y, y_fp, rtol=0, atol=0)


def _lstsq_gain_offset(yh, y):
    """Per channel j: [gamma_j, beta_j] = argmin ||y_j - gamma yh_j - beta||."""
    gam, bet = [], []
    for j in range(yh.shape[1]):
        A = torch.stack([yh[:, j], torch.ones_like(yh[:, j])], 1)
        sol = torch.linalg.lstsq(A, y[:, j:j + 1]).solution
        gam.append(sol[0, 0])
        bet.append(sol[1, 0])
    return torch.stack(gam), torch.stack(bet)


def test_gain_offset_is_per_channel_least_squares(case):
    _, q, _, _, _, _ = case
    adapter = q.clone()
    name = "blocks.0.mlp.fc1"
    layer = adapter.get(name)
    inputs = random_calib(N_CALIB, "train", BATCH)
    set_quant_state(adapter.model, True, True)
    # record the layer's input on the quantized model, then its quantized and float outputs
    rows_q, rows_fp = [], []

    def record(m, a, o):
        rows_q.append(o.reshape(-1, o.shape[-1]))
        rows_fp.append(m._op(a[0], m.float_weight(), m.float_bias()).reshape(-1, o.shape[-1]))

    h = layer.register_forward_hook(record)
    with torch.no_grad():
        for x in inputs:
            adapter.forward(x)
    h.remove()
    yh, y = torch.cat(rows_q).double(), torch.cat(rows_fp).double()
    g_ref, b_ref = _lstsq_gain_offset(yh, y)
    # the streaming statistics
    stats = ChannelStats(yh.shape[1], "cpu")
    stats.update(yh[:100].float(), y[:100].float(), -1)
    stats.update(yh[100:].float(), y[100:].float(), -1)
    g, b = stats.gain_offset()
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b, b_ref, rtol=1e-4, atol=1e-5)
    # fit_layer on the model (the forward stops at the layer)
    walk = iter(LayerwiseEngine(adapter, inputs))
    seg = next(walk)  # unit 0 (blocks.0), its inputs cached while the walk is alive
    g2, b2 = fit_layer(layer, seg, {})
    torch.testing.assert_close(g2, g_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b2, b_ref, rtol=1e-4, atol=1e-5)
    assert (g_ref - 1).abs().max() > 1e-3  # non-trivial gains


def test_each_layer_is_fitted_on_its_compensated_upstream_local_target(case):
    """target=local: in the final unfolded model every layer's (gamma, beta) is the per-channel
    least-squares fit of the float layer's output on the quantized layer's output, both on the
    input produced by the compensated upstream layers."""
    fp_adapter, q_adapter, _, _, _, _ = case
    unfolded, info = compensate(q_adapter, fp_adapter, fold=False, target="local")
    assert info["target"] == "local"
    model = unfolded.model
    inputs = random_calib(N_CALIB, "train", BATCH)
    rows = {}

    def hook(mod, args, out):
        x = args[0]
        xq = mod.in_quant(x) if mod.a_on and mod.in_quant is not None else x
        yh = mod._op(xq, mod.quant_weight(), mod.bias)  # its own affine excluded
        y = mod._op(x, mod.float_weight(), mod.float_bias())
        c = yh.shape[mod.out_channel_dim]
        r = rows.setdefault(mod, ([], []))
        r[0].append(yh.movedim(mod.out_channel_dim, -1).reshape(-1, c))
        r[1].append(y.movedim(mod.out_channel_dim, -1).reshape(-1, c))

    handles = [m.register_forward_hook(hook) for _, m in layers(model)]
    with torch.no_grad():
        for x in inputs:
            unfolded.forward(x)
    for h in handles:
        h.remove()
    for name, m in layers(model):
        yh, y = torch.cat(rows[m][0]).double(), torch.cat(rows[m][1]).double()
        g_ref, b_ref = _lstsq_gain_offset(yh, y)
        scale = float(y.abs().max())
        torch.testing.assert_close(m.out_gamma.double(), g_ref, rtol=1e-3, atol=1e-4, msg=name)
        torch.testing.assert_close(m.out_beta.double(), b_ref, rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_near_constant_channels_keep_gain_one():
    stats = ChannelStats(3, "cpu")
    g = torch.Generator().manual_seed(0)
    yh = torch.randn(500, 3, generator=g, dtype=torch.float64)
    yh[:, 1] = 2.5  # constant quantized output
    yh[:, 2] = 4.0 + 1e-6 * torch.randn(500, generator=g, dtype=torch.float64)  # Var 1e-12 << 1e-8 * E[yh^2]
    y = 0.7 * yh + 0.3 + 0.01 * torch.randn(500, 3, generator=g, dtype=torch.float64)
    stats.update(yh, y, -1)
    gamma, beta = stats.gain_offset(var_eps=1e-8)
    assert abs(float(gamma[0]) - 0.7) < 0.01
    assert float(gamma[1]) == 1.0 and float(gamma[2]) == 1.0
    torch.testing.assert_close(beta[1:], y[:, 1:].mean(0) - yh[:, 1:].mean(0))
    assert torch.isfinite(gamma).all() and torch.isfinite(beta).all()
    # shrinkage pulls gamma toward 1
    g_half, _ = stats.gain_offset(var_eps=1e-8, shrinkage=0.5)
    torch.testing.assert_close(g_half[0], 0.5 * gamma[0] + 0.5)


def test_dead_output_channel_in_a_model_gets_gain_one():
    fp_adapter, q_adapter = stage1()
    # a zero weight row: the quantized output of that channel is the constant bias
    for a in (fp_adapter, q_adapter):
        with torch.no_grad():
            a.get("blocks.0.mlp.fc1").weight[5].zero_()
    q_adapter.get("blocks.0.mlp.fc1").calibrate_weight()
    comp, _ = compensate(q_adapter, fp_adapter, fold=False)
    fc1 = comp.get("blocks.0.mlp.fc1")
    assert float(fc1.out_gamma[5]) == 1.0
    assert abs(float(fc1.out_beta[5])) < 1e-5  # FP and quantized outputs are the same constant


def test_fold_affine_is_exact_and_composes():
    _, q = stage1()
    layer = q.get("blocks.1.attn.proj")
    x = torch.randn(4, 17, 32)
    g = torch.Generator().manual_seed(1)
    g1, b1 = 1 + 0.2 * torch.randn(32, generator=g), 0.1 * torch.randn(32, generator=g)
    g2, b2 = 1 + 0.2 * torch.randn(32, generator=g), 0.1 * torch.randn(32, generator=g)
    with torch.no_grad():
        y0 = layer(x)
        fold_affine(layer, g1, b1)
        y1 = layer(x)
        torch.testing.assert_close(y1, g1 * y0 + b1, rtol=1e-5, atol=1e-5)
        fold_affine(layer, g2, b2)  # folding a second affine (e.g. a second pass) composes
        y2 = layer(x)
        torch.testing.assert_close(y2, g2 * (g1 * y0 + b1) + b2, rtol=1e-5, atol=1e-5)


def test_per_tensor_weights_fold_by_becoming_per_channel():
    """ptq=hist_w8a8 (per-tensor weight scales): the default fold turns each layer's scale into a
    per-channel one, exactly equal to the unfolded model, with no extra parameters; the row lists
    those layers. unfoldable=error refuses; keep_unfolded keeps the affine as modules."""
    fp_adapter, q_adapter = stage1("hist_w8a8", (8, 8))
    n_layers = len(layers(q_adapter.model))
    folded, info = compensate(q_adapter, fp_adapter, fold=True)
    assert info["layers_folded"] == n_layers and info["layers_unfolded"] == 0
    assert len(info["weight_scale_made_per_channel"]) == n_layers
    assert extra_params(folded.model) == 0
    for _, m in layers(folded.model):
        assert m.w_quant.spec.granularity == "channel" and m.w_quant.scale.shape[0] == m.weight.shape[0]
        assert m.w_quant.spec.symmetric and float(m.w_quant.zero.abs().max()) == 0.0  # still symmetric integer weights
    unfolded, info_u = compensate(q_adapter, fp_adapter, fold=True, unfoldable="keep_unfolded")
    assert info_u == {"layers_folded": 0, "layers_unfolded": n_layers, "target": "global"}
    assert extra_params(unfolded.model) > 0
    with torch.no_grad():
        y_f, y_u, y_q = folded.model(TEST_X), unfolded.model(TEST_X), q_adapter.model(TEST_X)
    assert rel(y_f, y_u) <= 1e-5 and rel(y_f, y_q) > 0
    assert fold_all(unfolded.model) == 0  # fold_all folds only where no scale has to change shape
    with pytest.raises(ValueError, match="unfoldable=error"):
        compensate(q_adapter, fp_adapter, fold=True, unfoldable="error")
    with pytest.raises(ValueError, match="unfoldable"):
        compensate(q_adapter, fp_adapter, unfoldable="sometimes")


def test_global_target_fits_each_layer_to_the_float_models_output(case):
    """target=global (default): every layer's (gamma, beta) is the per-channel least-squares fit of
    the FP model's output of that layer (the float chain on the same images) on the quantized
    layer's output along the compensated quantized chain."""
    fp, _, _, _, unfolded, info = case
    assert info["target"] == "global"
    inputs = random_calib(N_CALIB, "train", BATCH)
    fp_rows, q_rows = {}, {}

    def recorder(store, own_affine_excluded):
        def hook(mod, args, out):
            if own_affine_excluded:
                x = args[0]
                xq = mod.in_quant(x) if mod.a_on and mod.in_quant is not None else x
                out = mod._op(xq, mod.quant_weight(), mod.bias)
            dim = getattr(mod, "out_channel_dim", 1 if isinstance(mod, torch.nn.Conv2d) else -1)
            store.setdefault(hook.name, []).append(out.movedim(dim, -1).reshape(-1, out.shape[dim]))
        return hook

    handles = []
    for name, m in layers(unfolded.model):
        h = recorder(q_rows, True)
        h.name = name
        handles.append(m.register_forward_hook(h))
    for name, m in fp.model.named_modules():
        if name in dict(layers(unfolded.model)):
            h = recorder(fp_rows, False)
            h.name = name
            handles.append(m.register_forward_hook(h))
    with torch.no_grad():
        for x in inputs:
            unfolded.forward(x)
            fp.forward(x)
    for h in handles:
        h.remove()
    for name, m in layers(unfolded.model):
        yh, y = torch.cat(q_rows[name]).double(), torch.cat(fp_rows[name]).double()
        g_ref, b_ref = _lstsq_gain_offset(yh, y)
        scale = float(y.abs().max())
        torch.testing.assert_close(m.out_gamma.double(), g_ref, rtol=1e-3, atol=1e-4, msg=name)
        torch.testing.assert_close(m.out_beta.double(), b_ref, rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_segment_layers_are_in_forward_order(case):
    _, q, _, _, _, _ = case
    got = [[n for n, _ in seg.layers()] for seg in LayerwiseEngine(q, [TEST_X], kinds=("stem", "unit", "head"))]
    expected = [["patch_embed.proj"]]
    for i in range(2):
        expected.append([f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"])
    expected.append(["head"])
    assert got == expected


def test_second_pass_changes_almost_nothing(case):
    """A chain qwt_v2+qwt_v2: the second pass refits already compensated layers (gamma ~ 1,
    beta ~ 0) and folds again on top of the frozen codes; the model stays the one-pass model."""
    fp_adapter, q_adapter, folded, _, _, _ = case
    twice = q_adapter.clone()
    info = apply_variant(CompContext(twice, fp_adapter, random_calib, None, "cpu"), "qwt_v2+qwt_v2", settings(fold=True))
    assert info["qwt_v2"]["layers_folded"] == len(layers(twice.model))
    assert extra_params(twice.model) == 0
    with torch.no_grad():
        assert rel(twice.model(TEST_X), folded.model(TEST_X)) <= 1e-3
