"""CLIP zero-shot (open_clip): the rebuilt attention is open_clip's function, what each mode
quantizes and when its classifier is built, the unquantized-MultiheadAttention error, and one
embedded run through run.py (both modes)."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip("open_clip")

from qwt.errors import ConfigError  # noqa: E402
from qwt.models.open_clip import ExplicitAttention, OpenCLIPAdapter, ZeroShotCLIP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_clip(custom_text=False, batch_first=True):
    from open_clip.model import CLIP, CustomTextCLIP

    cls = CustomTextCLIP if custom_text else CLIP
    m = cls(embed_dim=16, vision_cfg=dict(image_size=16, patch_size=4, width=32, layers=2, head_width=8),
            text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=2), quick_gelu=True)
    for p in m.parameters():  # open_clip leaves some inits at zero; random values exercise every path
        if p.dim() > 0:
            p.data.normal_(0, 0.2)
    return m.eval()


def token_ids(n, ctx=8, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, ctx, dtype=torch.long)
    for i in range(n):
        L = int(torch.randint(2, ctx - 1, (1,), generator=g))
        ids[i, 0] = vocab - 2  # start
        ids[i, 1:L] = torch.randint(1, vocab - 2, (L - 1,), generator=g)
        ids[i, L] = vocab - 1  # end token: the largest id (argmax pooling)
    return ids


def class_tokens(classes=5, templates=3):
    return token_ids(classes * templates, seed=1).reshape(classes, templates, -1)


@pytest.mark.parametrize("custom_text", [False, True])
def test_rebuilt_attention_is_open_clips_forward(custom_text):
    ref = tiny_clip(custom_text)
    model = ZeroShotCLIP(copy.deepcopy(ref), class_tokens(), "vision")
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert sum(isinstance(m, ExplicitAttention) for m in model.modules()) == 4
    x, ids = torch.randn(3, 3, 16, 16), token_ids(4)
    # nn.MultiheadAttention's standard path (autograd on) computes exactly what the rebuilt one does
    with torch.enable_grad():
        assert torch.equal(model.encode_image(x), ref.encode_image(x))
        assert torch.equal(model.encode_text(ids), ref.encode_text(ids))
        assert torch.equal(model.clip.encode_text(ids), ref.encode_text(ids))
    # without autograd, PyTorch takes a fused fast path for the unmasked image tower: same up to rounding
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref.encode_image(x), rtol=0, atol=1e-5)
        assert torch.equal(model.encode_text(ids), ref.encode_text(ids))
    # the adapter's block view is the same function too (vision: logits; vision_text: embeddings)
    a = OpenCLIPAdapter(model)
    with torch.no_grad():
        assert torch.equal(a.forward(x), model(x))
        vt = OpenCLIPAdapter(ZeroShotCLIP(copy.deepcopy(ref), class_tokens(), "vision_text"))
        out = vt.forward({"image": x[:2], "text": ids[:2]})
        exp = torch.cat([nn.functional.normalize(ref.encode_image(x[:2]), dim=-1), nn.functional.normalize(ref.encode_text(ids[:2]), dim=-1)], -1)
        torch.testing.assert_close(out, exp, rtol=0, atol=1e-5)


def test_batch_first_false_and_masks():
    mha = nn.MultiheadAttention(32, 4, batch_first=False).eval()
    ex = ExplicitAttention.from_mha(mha)
    x = torch.randn(7, 2, 32)
    causal = torch.full((7, 7), float("-inf")).triu_(1)
    with torch.enable_grad():
        for m in (None, causal, causal.isinf()):
            assert torch.equal(ex(x, x, x, need_weights=False, attn_mask=m)[0], mha(x, x, x, need_weights=False, attn_mask=m)[0])


def _quantize(adapter, batches, w=4, a=4):
    from qwt.ptq import apply_ptq, get_specs

    apply_ptq(adapter, get_specs("repq_vit", w, a), batches, 2**18)


def _qwt(adapter, fp_adapter, batches):
    from qwt.compensation import CompContext, apply_variant, method_settings

    st = method_settings()
    st["qwt"].update(num_samples=len(batches), batch_size=1)
    return apply_variant(CompContext(adapter, fp_adapter, lambda n, t, bs, shard=False: batches), "qwt", st)["qwt"]


def test_vision_mode_classifier_from_fp_text_and_quantized():
    from qwt.quant.modules import QuantConv2d, QuantLinear

    clip = tiny_clip()
    fp = ZeroShotCLIP(copy.deepcopy(clip), class_tokens(), "vision")
    fp_rows = fp.class_embeddings()
    torch.testing.assert_close(fp.classifier.weight, fp_rows)  # built at model build, from the FP text tower
    model = copy.deepcopy(fp)
    a = OpenCLIPAdapter(model)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    _quantize(a, batches)
    info = _qwt(a, OpenCLIPAdapter(fp), batches)
    assert len(info["r2"]) == 2  # the visual blocks only
    assert isinstance(model.classifier, QuantLinear)  # the classifier is quantized (run bits) ...
    assert model.classifier.w_quant.spec.bits == 4 and model.classifier.in_quant.spec.bits == 4
    assert torch.equal(model.classifier.weight, fp.classifier.weight)  # ... with the FP text tower's rows
    conv = model.clip.visual.conv1
    assert isinstance(conv, QuantConv2d) and conv.w_quant.spec.bits == 4 and conv.in_quant.spec.bits == 8
    assert not any(isinstance(m, QuantLinear) for m in model.clip.transformer.modules())  # text tower float
    assert any(isinstance(m, QuantLinear) for m in model.clip.visual.transformer.modules())


def test_vision_text_mode_classifier_from_quantized_text_after_compensation():
    from qwt.quant.modules import QuantLinear
    from qwt.tasks.zeroshot import ZeroShotTask

    clip = tiny_clip()
    fp = ZeroShotCLIP(copy.deepcopy(clip), class_tokens(), "vision_text")
    model = copy.deepcopy(fp)
    a = OpenCLIPAdapter(model)
    assert [u.name for u in a.units()][2:] == ["clip.transformer.resblocks.0", "clip.transformer.resblocks.1"]
    batches = [{"image": torch.randn(4, 3, 16, 16), "text": token_ids(4, seed=s)} for s in range(3)]
    _quantize(a, batches)
    assert type(model.classifier) is nn.Linear  # not quantized
    assert all(isinstance(model.clip.get_submodule(f"transformer.resblocks.{i}.{n}"), QuantLinear)
               for i in range(2) for n in ("attn.qkv", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"))
    info = _qwt(a, OpenCLIPAdapter(fp), batches)
    assert len(info["r2"]) == 4  # visual and text blocks
    before = model.classifier.weight.clone()
    assert torch.equal(before, fp.classifier.weight)  # not rebuilt yet: the FP one
    # evaluation rebuilds it from the quantized, compensated text tower (and leaves it float)
    task = ZeroShotTask.__new__(ZeroShotTask)
    task._val = lambda: torch.utils.data.TensorDataset(torch.randn(6, 3, 16, 16), torch.arange(6) % 5)
    task.rt, task.device = {"eval_batch_size": 4}, torch.device("cpu")
    task.evaluate(a)
    rebuilt = model.classifier.weight.clone()
    assert not torch.allclose(rebuilt, before)
    torch.testing.assert_close(rebuilt, model.class_embeddings())
    from qwt.quant import set_quant_state

    set_quant_state(model, False, False)  # the float path gives back the FP classifier
    torch.testing.assert_close(model.class_embeddings(), fp.classifier.weight, rtol=0, atol=1e-5)


def test_multihead_attention_left_unquantized_is_an_error():
    model = ZeroShotCLIP(tiny_clip(), class_tokens(), "vision")
    # an MHA in the text tower is fine in vision mode (that tower stays float) ...
    model.clip.transformer.resblocks[0].attn = nn.MultiheadAttention(32, 4, batch_first=True)
    OpenCLIPAdapter(model).quant_roles()
    model.mode = "vision_text"  # ... but not when it is quantized
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        OpenCLIPAdapter(model).quant_roles()
    model.mode = "vision"
    model.clip.visual.transformer.resblocks[1].attn = nn.MultiheadAttention(32, 4, batch_first=True)
    with pytest.raises(ConfigError, match=r"clip\.visual\.transformer\.resblocks\.1\.attn"):
        OpenCLIPAdapter(model).quant_roles()


def test_real_path_fails_early(tmp_path):
    from qwt.tasks.zeroshot import ZeroShotTask

    cfg = {"task": "zeroshot", "zeroshot": {"mode": "vision"}, "runtime": {},
           "model": {"name": "clip_vit_b32", "source": "open_clip", "open_clip_name": "ViT-B-32-quickgelu", "pretrained": "openai"},
           "data": {"name": "imagenet_cc3m", "root": None, "cc3m_root": None}}
    with pytest.raises(ConfigError, match="data.root"):
        ZeroShotTask(cfg, torch.device("cpu"))
    for i in range(1000):
        (tmp_path / "val" / f"n{i:08d}").mkdir(parents=True)
    cfg["data"]["root"] = str(tmp_path)
    with pytest.raises(ConfigError, match="data.cc3m_root"):
        ZeroShotTask(cfg, torch.device("cpu"))
    cfg["data"]["cc3m_root"] = str(tmp_path)
    with pytest.raises(ConfigError, match="cc3m-train"):
        ZeroShotTask(cfg, torch.device("cpu"))
    (tmp_path / "cc3m-train-0000.tar").write_bytes(b"")
    cfg["model"]["checkpoint"] = str(tmp_path / "missing.bin")
    with pytest.raises(ConfigError, match="model.checkpoint"):
        ZeroShotTask(cfg, torch.device("cpu"))


def test_data_roots_do_not_change_the_row_key():
    from qwt.results import config_key

    c = {"task": "zeroshot", "data": {"name": "imagenet_cc3m", "root": "/a", "cc3m_root": "/b"}}
    d = {"task": "zeroshot", "data": {"name": "imagenet_cc3m", "root": "/x", "cc3m_root": "/y"}}
    assert config_key(c, "none") == config_key(d, "none")


@pytest.mark.skipif(not (ROOT / "qwt/models/weights/clip_embedded.pt").is_file(), reason="embedded CLIP weights not shipped")
def test_embedded_run_both_modes(tmp_path):
    rows = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(ROOT / "run.py"), "+exp=clip_embedded", f"results.path={rows}",
           f"hydra.sweep.dir={tmp_path}/sweep", "data.eval_images=200", "data.calib_pool=64", "ptq.num_samples=32",
           "compensation.variants=[none,qwt,qwt_v2,qft]", "compensation.qwt.num_samples=32",
           "compensation.qwt_v2.num_samples=32", "compensation.qft.num_samples=32", "compensation.qft.epochs=1",
           "compensation.qft.eval_loss=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = [json.loads(l) for l in rows.read_text().splitlines()]
    assert {(g["config"]["zeroshot"]["mode"], g["compensation"]) for g in got} == \
        {(m, v) for m in ("vision", "vision_text") for v in ("none", "qwt", "qwt_v2", "qft")}
    for g in got:
        assert g["task"] == "zeroshot" and 0 <= g["metrics"]["top1"] <= 100 and g["metrics"]["top5"] >= g["metrics"]["top1"]
        if g["compensation"] == "qwt":
            n_units = 4 if g["config"]["zeroshot"]["mode"] == "vision" else 7
            assert len(g["compensation_info"]["qwt"]["r2"]) == n_units


def test_cc3m_webdataset_reader(tmp_path):
    import io
    import tarfile

    from PIL import Image

    from qwt.tasks.zeroshot import read_cc3m_pairs

    for s in range(2):
        with tarfile.open(tmp_path / f"cc3m-train-{s:04d}.tar", "w") as tf:
            for k in range(5):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (k, s, 0)).save(buf, format="JPEG")
                for name, data in ((f"0{s}/{k:05d}.jpg", buf.getvalue()), (f"0{s}/{k:05d}.txt", f"caption {s} {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    shards = sorted(str(p) for p in tmp_path.glob("cc3m-train-*.tar"))
    pairs = read_cc3m_pairs(shards, 7, seed=0, per_shard=4)
    assert len(pairs) == 7 and all(c.startswith("caption ") for _, c in pairs)
    assert len({c for _, c in pairs}) == 7
    assert pairs == read_cc3m_pairs(shards, 7, seed=0, per_shard=4)  # seeded
    with pytest.raises(ConfigError, match="only 10"):
        read_cc3m_pairs(shards, 11, seed=0, per_shard=5)


def test_real_path_through_run_py(tmp_path):
    """The ImageNet + CC3M path end to end with a tiny open_clip model of our own config and a local
    checkpoint (stand-ins for ViT-B/32, ImageNet val and the CC3M shards), vision_text mode."""
    import io
    import tarfile

    import open_clip
    from PIL import Image

    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    (tmp_path / "qwt-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "qwt-tiny-clip.json"))
    torch.save(open_clip.create_model("qwt-tiny-clip").state_dict(), tmp_path / "tiny.pt")
    for i in range(1000):  # one image per class folder
        d = tmp_path / "imagenet" / "val" / f"n{i:08d}"
        d.mkdir(parents=True)
        Image.new("RGB", (40, 40), (i % 255, (7 * i) % 255, 0)).save(d / "x.JPEG")
    (tmp_path / "cc3m").mkdir()
    with tarfile.open(tmp_path / "cc3m" / "cc3m-train-0000.tar", "w") as tf:
        for k in range(80):
            buf = io.BytesIO()
            Image.new("RGB", (48, 40), (k, 255 - k, 3 * k)).save(buf, format="JPEG")
            for name, data in ((f"{k:05d}.jpg", buf.getvalue()), (f"{k:05d}.txt", f"a photo number {k}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    rows = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(ROOT / "run.py"), "+exp=clip_vt_w8a8", f"results.path={rows}", f"hydra.run.dir={tmp_path}/run",
           f"data.root={tmp_path}/imagenet", f"data.cc3m_root={tmp_path}/cc3m", "data.per_shard=80", "data.val_subset=40",
           f"model.open_clip_config={tmp_path}/qwt-tiny-clip.json", "model.open_clip_name=qwt-tiny-clip",
           f"model.checkpoint={tmp_path}/tiny.pt", "zeroshot.templates=[\"a photo of a {}.\"]",
           "ptq.num_samples=16", "ptq.batch_size=16", "compensation.variants=[none,qwt]",
           "compensation.qwt.num_samples=32", "compensation.qwt.batch_size=16", "runtime.eval_batch_size=20"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = [json.loads(l) for l in rows.read_text().splitlines()]
    assert [g["compensation"] for g in got] == ["none", "qwt"]
    assert all(g["dataset"] == "imagenet_cc3m" and g["config"]["zeroshot"]["mode"] == "vision_text" for g in got)
    assert len(got[1]["compensation_info"]["qwt"]["r2"]) == 4
