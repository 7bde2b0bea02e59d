"""QFT (qwt/compensation/qft.py): every degree of freedom trains, the distillation loss falls,
the preconditioning fold is an exact float identity, the export reproduces the trained model,
and the chains qft+qwt_v2 / qft+qwt run."""
import copy
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_resnet, make_tiny_swin, make_tiny_vit
from qwt.compensation import CompContext, apply_variant, method_settings, qft
from qwt.models import adapter_for
from qwt.ptq import apply_ptq, get_specs
from qwt.quant import set_quant_state
from qwt.quant.modules import _QuantWeighted

ROOT = Path(__file__).resolve().parents[1]
METHODS = method_settings()


def _randomize_bn(model):
    """timm zero-initialises each block's last BN: random statistics make every branch matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _tiny(kind, bits=(4, 8), n=16):
    """(fp adapter, stage-1 quantized adapter, inputs) of a tiny random model."""
    if kind == "vit":
        fp_model, ptq, x = make_tiny_vit(), "repq_vit", torch.randn(n, 1, 8, 8)
    elif kind == "swin":
        fp_model, ptq, x = make_tiny_swin(), "repq_vit", torch.randn(n, 1, 32, 32)
    else:
        fp_model, ptq, x = _randomize_bn(make_tiny_resnet()), "percentile", torch.randn(n, 1, 32, 32)
    fp = adapter_for(fp_model)
    q = fp.clone()
    apply_ptq(q, get_specs(ptq, *bits), [x])
    return fp, q, x


def _ctx(q, fp, x):
    def calib(n, transform, batch_size, shard=False):
        xs = x[:n]
        return [xs[i : i + batch_size] for i in range(0, len(xs), batch_size)]

    return CompContext(q, fp, calib, None, torch.device("cpu"), log=lambda *_: None)


def _cfg(**over):
    cfg = copy.deepcopy(METHODS["qft"])
    cfg.update(num_samples=16, batch_size=8, epochs=2)
    cfg.update(over)
    return cfg


# ViT: norm1->qkv, norm2->fc1 and v->proj per block; Swin adds downsample.norm->reduction;
# ResNet (BasicBlock): bn1->ReLU->conv2 per block
EXPECTED_SITES = {"vit": {"ln_linear": 4, "v_proj": 2, "bn_conv": 0}, "swin": {"ln_linear": 9, "v_proj": 4, "bn_conv": 0},
                  "resnet": {"ln_linear": 0, "v_proj": 0, "bn_conv": 4}}


@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])
def test_every_degree_of_freedom_gets_a_gradient(kind):
    fp, q, x = _tiny(kind)
    trainer = qft.QFT(q)
    assert {s: sum(p.site == s for p in trainer.pairs) for s in qft.SITES} == EXPECTED_SITES[kind]
    n_layers = sum(isinstance(m, _QuantWeighted) for m in q.model.modules())
    assert len(trainer.groups["weight"]) == len(trainer.groups["w_scale"]) == n_layers
    assert all(trainer.groups[g] for g in qft.GROUPS)
    with torch.no_grad():
        target = fp.forward(x)
    torch.nn.functional.mse_loss(q.forward(x), target).backward()
    for g in qft.GROUPS:
        for i, p in enumerate(trainer.groups[g]):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{kind}: {g}[{i}] got no gradient"


@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])
def test_preconditioning_fold_is_an_exact_float_identity(kind):
    fp, q, x = _tiny(kind)
    trainer = qft.QFT(q, train={"weight": False, "bias": False, "w_scale": False, "a_scale": False})
    with torch.no_grad():
        for pair in trainer.pairs:
            pair.t.normal_(0, 0.5)  # factors between ~0.4 and ~2.5
        ref = fp.forward(x)
    norm = q.get({"vit": "blocks.0.norm1", "swin": "layers.0.blocks.0.norm1", "resnet": "layer1.0.bn1"}[kind])
    before = norm.parametrizations.weight.original.detach().clone()
    trainer.finalize()
    assert not torch.allclose(norm.weight, before), "the factors were not folded into the float graph"
    with torch.no_grad():
        set_quant_state(q.model, False, False)  # the float graph of the folded model
        out = q.forward(x)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_export_after_training_reproduces_the_trained_model(kind):
    fp, q, x = _tiny(kind)
    stage1 = copy.deepcopy(q.model)
    seen = {}

    def on_trained(adapter, trainer):
        with torch.no_grad():
            seen["out"] = adapter.forward(x)
        seen["factors"] = trainer.factors()

    info = qft.apply(_ctx(q, fp, x), _cfg(_on_trained=on_trained))
    assert info["steps"] == 4 and all(v > 0 for v in info["trainable"].values())
    assert any((f - 1).abs().max() > 1e-4 for f in seen["factors"].values()), "preconditioning did not train"
    exported = qft.export(q.model)
    for name, e in exported["weights"].items():
        qz = q.get(name).w_quant.spec
        assert not e["codes"].is_floating_point() and int(e["codes"].min()) >= qz.qmin and int(e["codes"].max()) <= qz.qmax
    rebuilt = adapter_for(qft.load_export(stage1, exported))
    with torch.no_grad():
        set_quant_state(rebuilt.model, True, True)
        out_final, out_rebuilt = q.forward(x), rebuilt.forward(x)
        set_quant_state(q.model, False, False)
        out_float, ref = q.forward(x), fp.forward(x)
    assert torch.allclose(out_final, seen["out"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(out_rebuilt, seen["out"], rtol=1e-5, atol=1e-6)
    # the float path of the finetuned model is still the original float model (QwT's targets)
    assert ((out_float - ref).norm() / ref.norm()) < 1e-5


def test_distillation_loss_decreases_on_the_embedded_model_at_w4a8(embedded_vit):
    model, data = embedded_vit
    from qwt.tasks.classification import calibration_batches

    fp = adapter_for(model)
    q = fp.clone()
    apply_ptq(q, get_specs("rtn", 4, 8), [x for x, _ in calibration_batches(data, 32, "train", 32, 0, "cpu")])

    def calib(n, transform, batch_size, shard=False):
        return [x for x, _ in calibration_batches(data, n, transform, batch_size, 0, "cpu", shard=shard)]

    ctx = CompContext(q, fp, calib, None, torch.device("cpu"), log=lambda *_: None)
    info = qft.apply(ctx, _cfg(num_samples=256, batch_size=32, epochs=4))  # 32 steps, default learning rates
    assert info["steps"] == 32
    assert info["loss_after"] < 0.8 * info["loss_before"], {k: info[k] for k in ("loss_before", "loss_after", "loss_first", "loss_last")}


@pytest.mark.parametrize("variant", ["qft+qwt_v2", "qft+qwt"])
def test_chains_run(variant):
    fp, q, x = _tiny("vit", bits=(4, 4), n=32)
    settings = copy.deepcopy(METHODS)
    settings["qft"] = _cfg()
    for m in ("qwt", "qwt_v2"):
        settings[m].update(num_samples=32, batch_size=16)
    info = apply_variant(_ctx(q, fp, x), variant, settings)
    assert list(info) == variant.split("+")
    assert info["qft"]["steps"] == 4
    with torch.no_grad():
        out = q.forward(x)
        set_quant_state(q.model, False, False)
        out_float, ref = q.forward(x), fp.forward(x)
    assert torch.isfinite(out).all()
    assert ((out_float - ref).norm() / ref.norm()) < 1e-5
    if variant == "qft+qwt_v2":
        assert info["qwt_v2"]["layers_folded"] > 0
    else:
        assert info["qwt"]["blocks_compensated"] >= 0


def test_config_exposes_qft_and_the_chains():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        c = OmegaConf.to_container(compose(config_name="config", overrides=["compensation=qft"]), resolve=True)
        a = OmegaConf.to_container(compose(config_name="config"), resolve=True)
    assert c["compensation"]["variants"] == ["none", "qft"]
    assert {"qft", "qft+qwt_v2"} <= set(a["compensation"]["variants"])
    q = c["compensation"]["qft"]
    assert set(q["lr"]) == set(qft.GROUPS) and set(q["train"]) == set(qft.GROUPS)
    assert set(q["precond_sites"]) == set(qft.SITES)
