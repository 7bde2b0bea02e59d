"""The embedded benchmark (issue: a credible embedded classification benchmark): generated data,
shipped weights, logit distances in every row, QwT / QwT-v2 properties on the shipped model.
Every assertion is a property that holds on any CPU (the weights are shipped, not trained here)."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import embedded_data_cfg, embedded_model_cfg
from embedded_quant import calib_fn, quantized
from qwt.compensation import CompContext, apply_variant, method_settings
from qwt.data import digits_wild
from qwt.errors import ConfigError
from qwt.models import adapter_for, shipped
from qwt.tasks.classification import build_data, evaluate


def test_generation_is_deterministic_and_eval_glyphs_are_new_handwriting():
    spec = digits_wild.WildSpec()
    a, ya = digits_wild.generate("eval", 64, spec, seed=3)
    b, yb = digits_wild.generate("eval", 64, spec, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (64, 1, 32, 32)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, digits_wild.generate("eval", 64, spec, seed=4)[0])
    (xtr, _), (xva, _) = digits_wild.glyph_split()
    train = {tuple(g.flatten().tolist()) for g in xtr}
    # sklearn's digits hold a few exact duplicates; the split is by sample, so almost none coincide
    assert sum(tuple(g.flatten().tolist()) in train for g in xva) <= 2


def test_benchmark_size_matches_the_issue():
    cfg = embedded_data_cfg()
    assert int(cfg["n_eval"]) >= 5000 and int(cfg["n_train"]) >= 10000
    m = embedded_model_cfg("embedded_vit")["kwargs"]
    assert (m["img_size"] // m["patch_size"]) ** 2 >= 64  # >= 64 tokens


@pytest.mark.parametrize("name", ["embedded_vit", "embedded_resnet"])
def test_shipped_weights_carry_recipe_and_digest(name):
    state, meta = shipped.load_shipped(name)
    assert meta["sha256"] == shipped.file_sha256(shipped.weights_path(name))
    assert meta["recipe"]["kwargs"] == embedded_model_cfg(name)["kwargs"]  # the recipe of these weights
    assert shipped.weights_path(name).stat().st_size < 5 * 2**20  # a few MB at most
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_altered_weights_are_refused_with_the_retrain_command(tmp_path, monkeypatch):
    src = shipped.weights_path("embedded_vit")
    shutil.copy(src, tmp_path / src.name)
    shutil.copy(src.with_suffix(".json"), tmp_path / src.with_suffix(".json").name)
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    with open(tmp_path / src.name, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ConfigError, match="train_embedded.py embedded_vit"):
        shipped.load_shipped("embedded_vit")
    (tmp_path / src.name).unlink()
    with pytest.raises(ConfigError, match="no shipped weights"):
        shipped.load_shipped("embedded_vit")


def test_a_run_never_trains(monkeypatch):
    """Building the embedded model loads the shipped weights; the trainer is never called."""
    from qwt.models import zoo

    monkeypatch.setattr(zoo, "train_embedded_classifier", lambda *a, **k: pytest.fail("a run trained a model"))
    model = zoo.build_model(embedded_model_cfg("embedded_vit"))
    state, _ = shipped.load_shipped("embedded_vit")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_logit_distances_are_computed_against_fp(embedded_vit):
    model, data = embedded_vit
    sub = build_data(embedded_data_cfg(val_subset=300), embedded_model_cfg())
    assert len(sub.val) == 300
    m_fp, z_fp = evaluate(model, sub, 128, "cpu")
    m_same, _ = evaluate(model, sub, 128, "cpu", fp_logits=z_fp)
    assert m_same["logit_mse"] == 0.0 and abs(m_same["logit_kl"]) < 1e-9 and m_same["agreement"] == 100.0
    q, _ = quantized(embedded_vit, "repq_vit", 4, 4)
    m_q, z_q = evaluate(q.model, sub, 128, "cpu", fp_logits=z_fp)
    assert m_q["logit_mse"] == pytest.approx(float((z_q.double() - z_fp.double()).pow(2).mean()), rel=1e-9)
    kl = F.kl_div(F.log_softmax(z_q.double(), -1), F.log_softmax(z_fp.double(), -1), log_target=True, reduction="batchmean")
    assert m_q["logit_kl"] == pytest.approx(float(kl), rel=1e-9) and m_q["logit_kl"] > 0


def held_out_mse(model, fp, xs):
    with torch.no_grad():
        return float((model(xs) - fp).pow(2).mean())


@pytest.mark.parametrize("variant", ["qwt", "qwt_v2"])
def test_compensation_lowers_held_out_logit_mse_on_the_shipped_model_w4a4(embedded_vit, variant):
    """Fitted on training images, evaluated on held-out eval images (new handwriting): the logits
    move toward FP's. QwT-v2 with its default (global) target."""
    model, data = embedded_vit
    base, _ = quantized(embedded_vit, "repq_vit", 4, 4)
    adapter = base.clone()
    s = method_settings()
    s["qwt"].update(num_samples=256, batch_size=64)
    s["qwt_v2"].update(num_samples=256, batch_size=64)
    assert s["qwt_v2"]["target"] == "global"
    apply_variant(CompContext(adapter, adapter_for(model), calib_fn(data), None, "cpu"), variant, s)
    xs = torch.stack([data.val[i][0] for i in range(0, len(data.val), 5)])  # 1,000 eval images
    with torch.no_grad():
        fp = model(xs)
    assert held_out_mse(adapter.model, fp, xs) < held_out_mse(base.model, fp, xs)
