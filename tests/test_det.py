"""Detection family (mmdet 3 Mask R-CNN / Cascade Mask R-CNN with Swin): the block adapter
reproduces the detector, the mmdet 2 -> 3 checkpoint conversion, safe checkpoint loading under
torch >= 2.6, QwT-v2's fold on detector layers, and one embedded run through run.py."""
import copy
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

try:
    import mmcv.ops  # noqa: F401
    import mmdet.apis  # noqa: F401
except Exception as e:  # noqa: BLE001
    pytest.skip(f"the detection family needs mmdet 3.3 + mmcv 2.1 with ops (scripts/bootstrap.sh): {e}", allow_module_level=True)

from mmdet.utils import register_all_modules

from qwt.errors import ConfigError
from qwt.models import adapter_for
from qwt.models.mmdet_ckpt import (convert_mmdet2_swin, is_mmdet2_swin, load_checkpoint_file,
                                   load_detector_weights)
from qwt.models.mmdet_swin import MMDetSwinAdapter, metas_from_samples
from qwt.models.mmdet_zoo import build_detector

register_all_modules(init_default_scope=True)
EMB = {"name": "det_embedded", "mmdet_config": "qwt::embedded_mask_rcnn_swin.py"}


def tiny_detector(seed=0):
    torch.manual_seed(seed)
    m = build_detector(EMB)
    m.init_weights()
    return m.eval()


def make_batch(model, n=2, size=(96, 128), seed=0):
    from mmdet.structures import DetDataSample

    g = torch.Generator().manual_seed(seed)
    items = {"inputs": [], "data_samples": []}
    for i in range(n):
        img = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)
        s = DetDataSample()
        s.set_metainfo(dict(img_id=i, ori_shape=size, img_shape=size, scale_factor=(1.0, 1.0)))
        items["inputs"].append(img)
        items["data_samples"].append(s)
    data = model.data_preprocessor(items, False)
    batch = {"inputs": data["inputs"], **metas_from_samples(data["data_samples"])}
    return batch, data


@pytest.fixture(scope="module")
def det():
    return tiny_detector()


def test_adapter_is_registered_for_mmdet_detectors(det):
    a = adapter_for(det)
    assert isinstance(a, MMDetSwinAdapter)
    names = [u.name for u in a.units()]
    assert len(names) == 6 and names[0] == "backbone.stages.0.blocks.0"
    assert [u.pre for u in a.units()][2] == "backbone.stages.0.downsample"


def test_units_reproduce_the_backbone_and_the_detector(det):
    a = adapter_for(det)
    batch, data = make_batch(det)
    with torch.no_grad():
        s = a.stem(batch)
        for u in a.units():
            s = a.run_unit(u, s)
        ref_feats = det.backbone(data["inputs"])
        assert len(s.extras["outs"]) == len(ref_feats)
        for o, r in zip(s.extras["outs"], ref_feats):
            assert torch.equal(o, r)
        ours = a.head(s)
        ref = det.predict(data["inputs"], copy.deepcopy(data["data_samples"]), rescale=True)
    assert len(ours) == len(ref) == 2
    for p, r in zip(ours, ref):
        r = r.pred_instances
        assert len(p) == len(r) and len(p) > 0
        assert torch.equal(p.bboxes, r.bboxes) and torch.equal(p.scores, r.scores) and torch.equal(p.labels, r.labels)
        assert torch.equal(p.masks, r.masks)


def test_every_conv_and_linear_is_quantized_but_deconv_stays_float(det):
    from qwt.ptq import get_specs
    from qwt.ptq.common import build_plan

    a = adapter_for(det)
    roles = a.quant_roles()
    convs = {n for n, m in det.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert convs <= set(roles)  # backbone, FPN, RPN, box and mask heads
    assert any(n.startswith("neck.") for n in roles) and any(n.startswith("rpn_head.") for n in roles)
    assert any(n.startswith("roi_head.bbox_head") for n in roles) and any(n.startswith("roi_head.mask_head") for n in roles)
    assert "roi_head.mask_head.upsample" not in roles  # ConvTranspose2d: float
    plan = build_plan(a, get_specs("repq_vit", 4, 4))
    lq = plan("backbone.patch_embed.projection", a.get("backbone.patch_embed.projection"))
    assert lq.act.bits == 8 and lq.weight.bits == 4  # patch-embedding input 8-bit
    post = {n for n, r in roles.items() if r.post_norm}
    assert "backbone.stages.0.blocks.0.attn.w_msa.qkv" in post and "backbone.stages.0.downsample.reduction" in post
    assert "backbone.stages.0.blocks.0.ffn.layers.0.0" in post


def _original_patch_merging(x, hw, norm_w, norm_b, red_w):
    """The original Swin / mmdet 2 PatchMerging: concat [x(0,0), x(1,0), x(0,1), x(1,1)], LN, reduction."""
    B, L, C = x.shape
    H, W = hw
    x = x.view(B, H, W, C)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(B, -1, 4 * C)
    x = torch.nn.functional.layer_norm(x, (4 * C,), norm_w, norm_b)
    return x @ red_w.T


def _to_mmdet2_names(state):
    """mmdet 3 detector keys -> the reference's mmdet 2 names (tensors unchanged)."""
    out = {}
    for k, v in state.items():
        if k.startswith("backbone.stages."):
            k = k.replace("backbone.stages.", "backbone.layers.").replace(".attn.w_msa.", ".attn.")
            k = k.replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(".ffn.layers.1.", ".mlp.fc2.")
        k = k.replace("backbone.patch_embed.projection.", "backbone.patch_embed.proj.")
        out[k] = v
    return out


def test_mmdet2_checkpoint_conversion(det, tmp_path):
    # a state dict in the reference layout: original-Swin names, PatchMerging in concat order
    g = torch.Generator().manual_seed(1)
    state2 = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in _to_mmdet2_names(det.state_dict()).items()}
    assert is_mmdet2_swin(state2)
    conv = convert_mmdet2_swin(state2)
    assert set(conv) == set(det.state_dict())
    # the converted PatchMerging computes what the original one computes
    m = copy.deepcopy(det)
    m.load_state_dict(conv, strict=True)
    ds = m.backbone.stages[0].downsample
    x = torch.randn(2, 8 * 6, ds.reduction.in_features // 4, generator=g)
    with torch.no_grad():
        ref = _original_patch_merging(x, (8, 6), state2["backbone.layers.0.downsample.norm.weight"],
                                      state2["backbone.layers.0.downsample.norm.bias"],
                                      state2["backbone.layers.0.downsample.reduction.weight"])
        ours, hw = ds(x, (8, 6))
    assert hw == (4, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # through a file with mmdet 2's checkpoint wrapping (meta + state_dict)
    path = tmp_path / "mmdet2.pth"
    torch.save({"meta": {"mmdet_version": "2.11.0", "CLASSES": ("a", "b")}, "state_dict": state2}, path)
    m2 = tiny_detector(seed=5)
    assert load_detector_weights(m2, str(path)) == "mmdet2"
    for k, v in conv.items():
        assert torch.equal(m2.state_dict()[k], v)


def test_checkpoint_loading_is_safe_and_narrow(det, tmp_path):
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    # an mmdet 3 checkpoint: message hub with numpy values and HistoryBuffers
    path = tmp_path / "mmdet3.pth"
    torch.save({"meta": {"seed": np.int64(3), "arr": np.arange(3.0)},
                "message_hub": {"log_scalars": {"loss": HistoryBuffer()}},
                "state_dict": det.state_dict()}, path)
    state = load_checkpoint_file(str(path))
    assert set(state) == set(det.state_dict())
    # the allow-list applies to that call only: plain torch.load still refuses these globals
    with pytest.raises(pickle.UnpicklingError):
        torch.load(str(path), weights_only=True)
    # any other object is refused with the opt-in named
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": det.state_dict(), "meta": {"x": ConfigError("x")}}, bad)
    with pytest.raises(ConfigError, match="trust_checkpoint"):
        load_checkpoint_file(str(bad))
    assert set(load_checkpoint_file(str(bad), trust=True)) == set(det.state_dict())
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint_file(str(tmp_path / "missing.pth"))


def test_qwt_v2_fold_is_exact_on_detector_layers(det):
    from qwt.compensation.qwt_v2 import fold_affine
    from qwt.ptq import apply_ptq, get_specs

    a = adapter_for(copy.deepcopy(det))
    batch, _ = make_batch(det, n=1)
    apply_ptq(a, get_specs("rtn", 4, 4), [batch])
    g = torch.Generator().manual_seed(3)
    for name in ("backbone.stages.1.blocks.0.attn.w_msa.qkv", "neck.fpn_convs.0.conv", "roi_head.bbox_head.shared_fcs.0"):
        layer = a.get(name)
        x = torch.randn((5, layer.in_features) if hasattr(layer, "in_features") else (2, layer.in_channels, 9, 9), generator=g)
        c = layer.weight.shape[0]
        gamma, beta = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
        with torch.no_grad():
            y = layer(x)
            if y.dim() == 4:
                ref = y * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
            else:
                ref = y * gamma + beta
            fold_affine(layer, gamma, beta)
            torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_missing_coco_root_and_checkpoint_are_clear_errors(tmp_path):
    from qwt.tasks.detection import check_coco_root

    with pytest.raises(ConfigError, match="data.root is not set"):
        check_coco_root(None)
    with pytest.raises(ConfigError, match="instances_val2017.json"):
        check_coco_root(tmp_path)
    from qwt.models.mmdet_zoo import build_mmdet

    with pytest.raises(ConfigError, match="model.checkpoint"):
        build_mmdet({"name": "mask_rcnn_swin_t", "mmdet_config": "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py",
                     "checkpoint": None})


def test_embedded_run_through_run_py(tmp_path):
    """base, QwT, QwT-v2, QFT (and QwT*) rows with box and mask AP (a few val images, small calibration sets)."""
    res = tmp_path / "runs.jsonl"
    cmd = [sys.executable, str(ROOT / "run.py"), "+exp=det_embedded", f"results.path={res}",
           f"hydra.run.dir={tmp_path}/run", "data.val_subset=8", "runtime.threads=1",
           "compensation.qwt.num_samples=8", "compensation.qwt.batch_size=4",
           "compensation.qwt_v2.num_samples=4", "compensation.qwt_v2.batch_size=4",
           "compensation.qft.num_samples=8", "compensation.qft.batch_size=4", "compensation.qft.epochs=1",
           "compensation.qft.eval_loss=false", "compensation.variants=[none,qwt,qwt_v2,qft,qwt_star]",
           "data.train_subset=8", "compensation.qwt_star.batch_size=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert [row["compensation"] for row in rows] == ["none", "qwt", "qwt_v2", "qft", "qwt_star"]
    for row in rows:
        m = row["metrics"]
        assert row["task"] == "detection" and m["num_images"] == 8
        for kind in ("bbox", "segm"):
            for k in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"):
                assert f"{kind}_{k}" in m
            assert m[f"{kind}_mAP"] is not None and 0 <= m[f"{kind}_mAP"] <= 100
    qwt_row = rows[1]
    assert qwt_row["compensation_info"]["qwt"]["blocks_compensated"] >= 1
    assert qwt_row["extra_params"] > 0 and rows[2]["extra_params"] == 0
    assert rows[4]["compensation_info"]["qwt_star"]["steps"] == 2  # 8 train images, batches of 4
