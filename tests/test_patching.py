"""Model patching (qwt/quant/patch.py) through the stage-1 methods (qwt/ptq): every Linear, Conv2d
and attention matmul is wrapped, the 8-bit exceptions hold, quantization off is the float model."""
import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention

from conftest import make_tiny_resnet, make_tiny_swin, make_tiny_vit
from qwt.models import adapter_for
from qwt.ptq import apply_ptq, get_specs
from qwt.quant import LayerQuant, QuantConv2d, QuantLinear, QuantMatMul, QuantSpec, quantize_model, set_quant_state
from qwt.models.timm_attention import QuantAttention, QuantWindowAttention

W_BITS, A_BITS = 4, 6  # different, so a weight / activation mix-up shows
METHODS = ["rtn", "percentile", "repq_vit", "hist_w8a8"]

FAMILIES = {
    "deit": (lambda: make_tiny_vit(), (1, 8, 8), {"patch_embed.proj", "head"}),
    "deit_distilled": (lambda: make_tiny_vit(distilled=True), (1, 8, 8), {"patch_embed.proj", "head", "head_dist"}),
    "swin": (lambda: make_tiny_swin(img=16), (1, 16, 16), {"patch_embed.proj", "head.fc"}),
    "resnet": (lambda: make_tiny_resnet(), (1, 16, 16), {"conv1", "fc"}),
    "resnet_bottleneck": (lambda: make_tiny_resnet(bottleneck=True), (1, 16, 16), {"conv1", "fc"}),
}


def count(model, types):
    return sum(isinstance(m, types) for m in model.modules())


def quantize(fp, method, input_shape, w_bits=W_BITS, a_bits=A_BITS, n=4):
    q = copy.deepcopy(fp)
    adapter = adapter_for(q)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, *input_shape, generator=g) for _ in range(2)]  # two batches: streamed ranges
    apply_ptq(adapter, get_specs(method, w_bits, a_bits), batches)
    return q


@pytest.fixture(scope="module")
def quantized_models():
    """{(family, method): (float model, quantized model, input shape, 8-bit layer names)}"""
    torch.manual_seed(0)
    out = {}
    for fam, (make, shape, eight) in FAMILIES.items():
        fp = make()
        for method in METHODS:
            out[fam, method] = (fp, quantize(fp, method, shape), shape, eight)
    return out


CASES = [(f, m) for f in FAMILIES for m in METHODS]


@pytest.mark.parametrize("family,method", CASES)
def test_every_layer_and_matmul_is_wrapped(quantized_models, family, method):
    fp, q, _, _ = quantized_models[family, method]
    n_lin, n_conv = count(fp, nn.Linear), count(fp, nn.Conv2d)
    n_attn = count(fp, (Attention, WindowAttention))
    assert n_lin > 0 and n_conv > 0
    if family.startswith("resnet"):
        assert n_attn == 0
    else:
        assert n_attn > 0
    assert count(q, QuantLinear) == n_lin
    assert count(q, QuantConv2d) == n_conv
    assert count(q, QuantMatMul) == 2 * n_attn
    assert count(q, (QuantAttention, QuantWindowAttention)) == n_attn
    # nothing float is left behind
    assert count(q, nn.Linear) == 0 and count(q, nn.Conv2d) == 0
    for m in q.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            assert m.w_quant is not None and m.in_quant is not None
            assert m.w_quant.calibrated and m.in_quant.calibrated and m.w_on and m.a_on
        if isinstance(m, QuantMatMul):
            assert m.a_quant.calibrated and m.b_quant.calibrated and m.a_on


@pytest.mark.parametrize("family,method", CASES)
def test_eight_bit_exceptions(quantized_models, family, method):
    _, q, _, eight = quantized_models[family, method]
    names = {n for n, m in q.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    assert eight <= names
    for name, m in q.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            want_w, want_a = (8, 8) if name in eight else (W_BITS, A_BITS)
            if method == "repq_vit" and name in eight:  # the official RepQ-ViT rule (numerics.edge_layers=reference)
                want_w, want_a = (W_BITS, 8) if isinstance(m, QuantConv2d) else (W_BITS, A_BITS)
            assert (m.w_quant.spec.bits, m.in_quant.spec.bits) == (want_w, want_a), name
        if isinstance(m, QuantMatMul):
            assert m.a_quant.spec.bits == A_BITS and m.b_quant.spec.bits == A_BITS, name


def test_method_specific_quantizers(quantized_models):
    _, q, _, _ = quantized_models["deit", "repq_vit"]
    attn = q.blocks[0].attn
    assert attn.matmul2.a_quant.spec.scheme == "log_sqrt2"  # post-softmax probabilities
    assert attn.matmul1.a_quant.spec.scheme == "uniform"
    assert q.blocks[0].mlp.fc2.w_quant.spec.granularity == "channel"
    _, q, _, _ = quantized_models["deit", "hist_w8a8"]
    lin = q.blocks[0].mlp.fc1
    assert lin.w_quant.spec.symmetric and lin.w_quant.spec.granularity == "tensor" and lin.w_quant.scale.dim() == 0
    assert float(lin.in_quant.zero) == 0.0
    _, q, _, _ = quantized_models["resnet", "percentile"]
    assert q.layer1[0].conv1.w_quant.scale.shape == (q.layer1[0].conv1.out_channels, 1, 1, 1)


@pytest.mark.parametrize("family,method", CASES)
def test_quantization_off_equals_float_model(quantized_models, family, method):
    fp, q, shape, _ = quantized_models[family, method]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y_fp = fp(x)
        y_on = q(x)
        set_quant_state(q, False, False)
        try:
            y_off = q(x)
        finally:
            set_quant_state(q, True, True)
    if method == "repq_vit" and not family.startswith("resnet"):
        # the reparameterization rewrites LayerNorm / Linear weights: equal up to float rounding
        torch.testing.assert_close(y_off, y_fp, rtol=1e-5, atol=1e-5 * float(y_fp.abs().max()))
    else:
        # same weights, same ops in the same order: bit-identical (rtol = atol = 0)
        torch.testing.assert_close(y_off, y_fp, rtol=0, atol=0)
    # and quantization on does change the output (W4A6)
    assert not torch.allclose(y_on, y_fp, rtol=1e-3, atol=1e-3)


def test_unregistered_module_type_raises_type_error():
    model = make_tiny_vit()

    def plan(name, module):
        if isinstance(module, nn.LayerNorm):
            return LayerQuant(weight=QuantSpec(), act=QuantSpec())
        return None

    with pytest.raises(TypeError, match="register_patcher"):
        quantize_model(model, plan)


def test_custom_patcher_via_registry_is_used():
    from qwt.quant import patch

    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    class QuantScale(nn.Module):
        def forward(self, x):
            return 3 * x

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    try:
        patch.register_patcher(Scale)(lambda m, lq, max_elements: QuantScale())
        patched = quantize_model(model, lambda n, m: LayerQuant(weight=QuantSpec()) if isinstance(m, Scale) else None)
    finally:
        patch.PATCHERS.pop(Scale, None)
    assert patched == {"1": "QuantScale"} and isinstance(model[1], QuantScale)


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_fused_attention_cannot_bypass_the_quantized_matmuls(quantized_models, family):
    fp, q, shape, _ = quantized_models[family, "rtn"]
    attns = [m for m in q.modules() if isinstance(m, (QuantAttention, QuantWindowAttention))]
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    handles = []
    for a in attns:
        a.fused_attn = True  # what timm's default / a user could set
        handles += [a.matmul1.register_forward_hook(hook), a.matmul2.register_forward_hook(hook)]
    x = torch.randn(2, *shape)
    try:
        with torch.no_grad():
            y = q(x)
            set_quant_state(q, False, False)
            y_off = q(x)
            set_quant_state(q, True, True)
    finally:
        for h in handles:
            h.remove()
        for a in attns:
            a.fused_attn = False
    assert calls["n"] == 2 * 2 * len(attns)  # two matmuls per attention, two forwards
    # the explicit path is the one that ran: quantization off still equals the float model exactly
    torch.testing.assert_close(y_off, fp(x), rtol=0, atol=0)
    assert torch.isfinite(y).all()


def test_patching_an_already_patched_model_fails_loudly():
    q = quantize(make_tiny_vit(), "rtn", (1, 8, 8))
    with pytest.raises(TypeError, match="register_patcher"):
        quantize_model(q, lambda n, m: LayerQuant() if isinstance(m, QuantAttention) else None)
