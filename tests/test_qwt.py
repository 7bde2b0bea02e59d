"""QwT (qwt/compensation/qwt.py): closed-form linear side branches, fitted block by block."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_tiny_resnet, make_tiny_swin, make_tiny_vit
from qwt.compensation import CompContext, apply_variant, extra_params, method_settings as load_method_settings
from qwt.compensation.lstsq import StreamingLeastSquares
from qwt.compensation.qwt import QwTBlock
from qwt.models import adapter_for
from qwt.ptq import apply_ptq, get_specs
from qwt.quant import set_quant_state


def method_settings(**qwt_overrides):
    s = load_method_settings()
    s["qwt"].update(qwt_overrides)
    s["qwt_star"]["qwt"] = s["qwt"]
    return s


def random_calib(shape, seed=0):
    """calib(n, transform, batch_size, shard) -> the same n random images on every call."""

    def calib(n, transform, batch_size, shard=False):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *shape, generator=g)
        return [x[i:i + batch_size] for i in range(0, n, batch_size)]

    return calib


def quantized_tiny(make, shape, method="rtn", bits=(4, 4)):
    fp = make()
    q_adapter = adapter_for(copy.deepcopy(fp))
    apply_ptq(q_adapter, get_specs(method, *bits), random_calib(shape, seed=1)(16, "train", 16))
    return adapter_for(fp), q_adapter


def compensate(q_adapter, fp_adapter, calib, **overrides):
    adapter = q_adapter.clone()
    settings = method_settings(**overrides)
    info = apply_variant(CompContext(adapter, fp_adapter, calib, None, "cpu"), "qwt", settings)["qwt"]
    return adapter, info, settings


VIT_SHAPE = (1, 8, 8)
N_CALIB = 64  # one batch, so the recorded first-batch X is the whole calibration set


@pytest.fixture(scope="module")
def vit_case():
    torch.manual_seed(0)
    fp_adapter, q_adapter = quantized_tiny(make_tiny_vit, VIT_SHAPE)
    calib = random_calib(VIT_SHAPE)
    record = {}
    comp, info, _ = compensate(q_adapter, fp_adapter, calib, num_samples=N_CALIB, batch_size=N_CALIB, _record=record,
                               branch_precision="fp32")  # the least-squares math; branch precisions are tested apart
    return fp_adapter, q_adapter, comp, info, record, calib


def block_errors(block: QwTBlock, x):
    """(||Y_FP - Y_Q||, ||Y_FP - Y_QwT||) of one compensated block on input x."""
    with torch.no_grad():
        set_quant_state(block, False, False)
        y_fp = block(x)
        set_quant_state(block, True, True)
        y_comp = block(x)
        y_q = block.block(x)  # the quantized block without its branch
    return float((y_fp - y_q).norm()), float((y_fp - y_comp).norm())


def test_qwt_reduces_each_block_error_on_the_calibration_input(vit_case):
    _, _, comp, info, record, _ = vit_case
    units = comp.units()
    assert info["blocks_compensated"] == len(units) == 2
    for k, u in enumerate(units):
        block = comp.get(u.name)
        assert isinstance(block, QwTBlock) and block.r2 == info["r2"][k] > 0
        before, after = block_errors(block, record[k])
        assert after < before, (k, before, after)
        # the branch is X W + b: a Linear d -> d
        assert isinstance(block.branch, nn.Linear) and block.branch.weight.shape == (32, 32)


@pytest.mark.parametrize("k", [0, 1])
def test_branch_is_the_least_squares_solution(vit_case, k):
    """The branch solves min ||(Y_FP - Y_Q) - X W - b||^2 + lambda ||[W; b]||^2 over every token of
    the block input, lambda = ridge * mean(diag(A^T A)) (configured ridge 1e-6, relative)."""
    _, _, comp, _, record, _ = vit_case
    block = comp.get(f"blocks.{k}")
    x = record[k]
    with torch.no_grad():
        set_quant_state(block, False, False)
        y_fp = block(x)
        set_quant_state(block, True, True)
        y_q = block.block(x)
        fit = block.branch(x)
    X = x.reshape(-1, 32).double()
    R = (y_fp - y_q).reshape(-1, 32).double()
    A = torch.cat([X, torch.ones_like(X[:, :1])], 1)
    G = A.T @ A
    lam = 1e-6 * float(G.diagonal().mean())
    theta = torch.linalg.solve(G + lam * torch.eye(33, dtype=torch.float64), A.T @ R)
    W_ref, b_ref = theta[:-1].T, theta[-1]
    assert float((block.branch.weight.double() - W_ref).norm() / W_ref.norm()) <= 1e-5
    assert float((block.branch.bias.double() - b_ref).norm() / b_ref.norm()) <= 1e-5
    sse = float((R - fit.reshape(-1, 32).double()).pow(2).sum())
    sst = float((R - R.mean(0)).pow(2).sum())
    assert abs(block.r2 - (1 - sse / sst)) <= 1e-4
    if k == 1:
        # block 1's input is well conditioned (smallest eigenvalue of A^T A >> lambda): the fit is the
        # plain least-squares optimum. (Block 0's input, 2x2x1 patches embedded in 32 dims plus 17
        # position embeddings, has rank < 33 and weak directions that the ridge shrinks.)
        opt = torch.linalg.lstsq(A, R, driver="gelsd").solution
        sse_opt = float((R - A @ opt).pow(2).sum())
        assert sse <= sse_opt + 1e-3 * (sst - sse_opt)


def test_sequential_fit_sees_the_compensated_upstream(vit_case):
    _, q_adapter, comp, _, record, calib = vit_case
    x0 = calib(N_CALIB, "train", N_CALIB)[0]
    with torch.no_grad():
        set_quant_state(comp.model, True, True)
        h = comp.stem(x0)
        h_uncomp = q_adapter.stem(x0)
        for k, u in enumerate(comp.units()):
            torch.testing.assert_close(record[k], comp.unit_input(u, h)[0], rtol=1e-6, atol=1e-6)
            if k > 0:  # block k's input is not the uncompensated quantized chain's
                assert not torch.allclose(record[k], q_adapter.unit_input(u, h_uncomp)[0], rtol=1e-3, atol=1e-3)
            h = comp.run_unit(u, h)
            h_uncomp = q_adapter.run_unit(u, h_uncomp)


def test_start_block_leaves_earlier_blocks_alone(vit_case):
    fp_adapter, q_adapter, _, _, _, calib = vit_case
    comp, info, _ = compensate(q_adapter, fp_adapter, calib, num_samples=N_CALIB, batch_size=N_CALIB, start_block=1)
    assert info["r2"][0] is None and info["r2"][1] > 0 and info["blocks_compensated"] == 1
    assert not isinstance(comp.get("blocks.0"), QwTBlock) and isinstance(comp.get("blocks.1"), QwTBlock)
    # block 0 is exactly the stage-1 block
    x = torch.randn(2, *VIT_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(comp.get("blocks.0")(comp.stem(x).h), q_adapter.get("blocks.0")(q_adapter.stem(x).h), rtol=0, atol=0)


def test_block_without_quantization_error_gets_no_branch(vit_case):
    """A block that quantization does not touch: Y_FP == Y_Q, the residual is exactly zero, SST = 0,
    R^2 <= 0 -> no QwTBlock (and its neighbours are still compensated)."""
    fp_adapter, q_adapter, _, _, _, calib = vit_case
    q2 = q_adapter.clone()
    float_block = copy.deepcopy(fp_adapter.get("blocks.1"))  # unpatched float block
    q2.set_module("blocks.1", float_block)
    comp, info, _ = compensate(q2, fp_adapter, calib, num_samples=N_CALIB, batch_size=N_CALIB)
    assert info["r2"][1] <= 0
    assert comp.get("blocks.1") is not None and not isinstance(comp.get("blocks.1"), QwTBlock)
    assert isinstance(comp.get("blocks.0"), QwTBlock)
    assert info["blocks_compensated"] == 1
    assert extra_params(comp.model) == 32 * 32 + 32


def test_gate_rejects_blocks_with_nonpositive_r2(vit_case, monkeypatch):
    fp_adapter, q_adapter, _, _, _, calib = vit_case
    monkeypatch.setattr(StreamingLeastSquares, "r2", lambda self, W, b: -0.25)
    comp, info, _ = compensate(q_adapter, fp_adapter, calib, num_samples=N_CALIB, batch_size=N_CALIB)
    assert info["blocks_compensated"] == 0 and info["r2"] == [-0.25, -0.25]
    assert not any(isinstance(m, QwTBlock) for m in comp.model.modules())
    x = torch.randn(3, *VIT_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(comp.model(x), q_adapter.model(x), rtol=0, atol=0)


def test_extra_params_is_d_squared_plus_d_per_block(vit_case):
    _, q_adapter, comp, info, _, _ = vit_case
    d = 32
    assert extra_params(q_adapter.model) == 0
    assert extra_params(comp.model) == info["blocks_compensated"] * (d * d + d) == 2 * (d * d + d)


def test_quantization_off_disables_the_branches(vit_case):
    fp_adapter, _, comp, _, _, _ = vit_case
    x = torch.randn(3, *VIT_SHAPE)
    with torch.no_grad():
        set_quant_state(comp.model, False, False)
        try:
            y = comp.model(x)
        finally:
            set_quant_state(comp.model, True, True)
        torch.testing.assert_close(y, fp_adapter.model(x), rtol=0, atol=0)


def test_fp16_branch_option(vit_case):
    fp_adapter, q_adapter, comp32, _, record, calib = vit_case
    comp16, info, _ = compensate(q_adapter, fp_adapter, calib, num_samples=N_CALIB, batch_size=N_CALIB, branch_precision="fp16")
    b16, b32 = comp16.get("blocks.0"), comp32.get("blocks.0")
    assert b16.precision == "fp16" and b16.branch.weight.dtype == torch.float16 and b32.precision == "fp32"
    # block 0 is fitted on the same input either way: the same W, b, rounded to float16
    torch.testing.assert_close(b16.branch.weight, b32.branch.weight.half(), rtol=0, atol=0)
    x = record[0]
    try:
        with torch.no_grad():
            y16 = b16(x)
    except RuntimeError as e:  # some CPU builds lack half-precision matmul kernels
        pytest.skip(f"float16 linear unavailable on this CPU build: {e}")
    with torch.no_grad():
        y32 = b32(x)
        branch16 = y16 - b16.block(x)
        branch32 = y32 - b32.block(x)
    assert y16.dtype == torch.float32
    # the branch output differs by float16 rounding only
    assert float((branch16 - branch32).norm() / branch32.norm()) < 5e-3


def test_swin_blocks_compensated_patch_merging_not():
    torch.manual_seed(0)
    shape = (1, 16, 16)
    fp_adapter, q_adapter = quantized_tiny(lambda: make_tiny_swin(img=16), shape, method="repq_vit")
    record = {}
    comp, info, _ = compensate(q_adapter, fp_adapter, random_calib(shape), num_samples=16, batch_size=16, _record=record)
    units = comp.units()
    assert [u.pre for u in units] == [None, None, "layers.1.downsample", None]
    assert info["blocks_compensated"] == 4
    assert not isinstance(comp.get("layers.1.downsample"), QwTBlock)
    assert type(comp.get("layers.1.downsample")) is type(q_adapter.get("layers.1.downsample"))
    for k, u in enumerate(units):
        block = comp.get(u.name)
        assert isinstance(block, QwTBlock)
        # the recorded X is the block's own input (after PatchMerging for the first block of stage 1)
        assert record[k].shape[-1] == block.branch.in_features == (16 if k < 2 else 32)
        before, after = block_errors(block, record[k])
        assert after < before, (u.name, before, after)
    d = [16, 16, 32, 32]
    assert extra_params(comp.model) == sum(c * c + c for c in d)


def randomize_batchnorms(model):
    """timm zero-initialises each block's last BatchNorm (the residual branch then outputs 0 and a
    quantization error there is multiplied by 0); give every BatchNorm random affine parameters."""
    g = torch.Generator().manual_seed(321)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("bottleneck", [False, True])
def test_resnet_grouped_branch(bottleneck):
    torch.manual_seed(0)
    shape = (1, 32, 32)
    fp_adapter, q_adapter = quantized_tiny(lambda: randomize_batchnorms(make_tiny_resnet(bottleneck=bottleneck)), shape, method="percentile")
    calib = random_calib(shape)
    record = {}
    group_channels = 8
    comp, info, _ = compensate(q_adapter, fp_adapter, calib, num_samples=16, batch_size=16, group_channels=group_channels, _record=record)
    units = comp.units()
    assert info["blocks_compensated"] == len(units) == 4
    total = 0
    for k, u in enumerate(units):
        block = comp.get(u.name)
        assert isinstance(block, QwTBlock)
        inner = block.block
        conv = block.branch
        c_in = inner.conv1.in_channels
        c_out = (inner.conv3 if bottleneck else inner.conv2).out_channels
        stride = 1 if u.name.startswith("layer1") else 2
        groups = c_in // group_channels
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
        assert (conv.in_channels, conv.out_channels, conv.groups) == (c_in, c_out, groups)
        assert conv.stride == (stride, stride) and conv.padding == (0, 0)
        assert conv.weight.shape == (c_out, c_in // groups, 1, 1)
        before, after = block_errors(block, record[k])
        assert after < before, (u.name, before, after)
        total += conv.weight.numel() + conv.bias.numel()
    assert extra_params(comp.model) == total


def test_resnet_groups_fall_back_to_one_when_channels_do_not_divide():
    torch.manual_seed(0)
    shape = (1, 32, 32)
    fp_adapter, q_adapter = quantized_tiny(make_tiny_resnet, shape)
    # layer1: 64 -> 16 channels; group_channels=12 gives 64 // 12 = 5 groups, and 64 % 5 != 0 -> 1 group
    comp, _, _ = compensate(q_adapter, fp_adapter, random_calib(shape), num_samples=8, batch_size=8, group_channels=12)
    assert comp.get("layer1.0").branch.groups == 1


def test_reference_branch_precision_fits_in_float32_and_infers_in_float16(vit_case):
    """branch_precision=fp16_eval (the reference): later blocks are fitted on the float32 branch
    (the same branches as fp32), and at inference x and W run in float16, the product is cast
    back and the float32 bias added."""
    fp_adapter, q_adapter, comp32, _, record, calib = vit_case
    comp, info, _ = compensate(q_adapter, fp_adapter, calib, num_samples=N_CALIB, batch_size=N_CALIB, branch_precision="fp16_eval")
    assert info["branch_precision"] == "fp16_eval"
    for k in range(2):
        a, b = comp.get(f"blocks.{k}"), comp32.get(f"blocks.{k}")
        assert a.branch.weight.dtype == torch.float32 and not a.fitting
        torch.testing.assert_close(a.branch.weight, b.branch.weight, rtol=0, atol=0)  # fitted in float32
    blk, x = comp.get("blocks.1"), record[1]
    try:
        with torch.no_grad():
            y = blk.branch_out(x)
    except RuntimeError as e:
        pytest.skip(f"float16 linear unavailable on this CPU build: {e}")
    expected = F.linear(x.half(), blk.branch.weight.half()).float() + blk.branch.bias
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    blk.fitting = True
    with torch.no_grad():
        torch.testing.assert_close(blk.branch_out(x), blk.branch(x), rtol=0, atol=0)
    blk.fitting = False


def test_branch_that_overflows_float16_stays_float32(vit_case, monkeypatch):
    fp_adapter, q_adapter, _, _, _, calib = vit_case
    real = StreamingLeastSquares.solve

    def huge(self, ridge=1e-6, max_tries=12):
        W, b = real(self, ridge, max_tries)
        return W * 1e9, b  # as a ridge-free solve of a singular block can give
    monkeypatch.setattr(StreamingLeastSquares, "solve", huge)
    monkeypatch.setattr(StreamingLeastSquares, "r2", lambda self, W, b: 0.5)
    comp, info, _ = compensate(q_adapter, fp_adapter, calib, num_samples=N_CALIB, batch_size=N_CALIB, branch_precision="fp16")
    kept = info["branches_kept_fp32"]
    assert 0 in kept
    for k in kept:  # recorded, and really float32
        blk = comp.get(f"blocks.{k}")
        assert blk.precision == "fp32" and blk.branch.weight.dtype == torch.float32
        assert float(blk.branch.weight.abs().max()) > 65504
