"""DiT generation: the adapter reproduces diffusers' forward, the guidance convention (original DiT
vs DiTPipeline), Q-DiT's quantizer math on a DiT layer, calibration sets, and one end-to-end
embedded run through run.py (tiny sample counts)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_dit(in_ch=1, out_ch=None, classes=10, layers=2, size=16, patch=4, seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=in_ch, out_channels=out_ch,
                              num_layers=layers, sample_size=size, patch_size=patch, num_embeds_ada_norm=classes).eval()
    with torch.no_grad():  # adaLN-zero starts at zero: give every weight a value so all paths matter
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def batch(n=4, ch=1, size=16, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, ch, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, classes + 1, (n,), generator=g))


# -- the adapter ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True])
def test_adapter_reproduces_the_forward(wrapped):
    from qwt.models.base import adapter_for
    from qwt.models.dit import DiTGenerator

    tr = tiny_dit(in_ch=4, out_ch=8, classes=1000, size=8, patch=2)
    model = DiTGenerator(tr) if wrapped else tr
    a = adapter_for(model)
    x, t, y = batch(3, ch=4, size=8, classes=1000)
    with torch.no_grad():
        ref = tr(x, t, y).sample
        out = a.forward((x, t, y))
        # a scalar timestep is broadcast as diffusers' pipeline does
        ref0, out0 = tr(x, t[:1].expand(3), y).sample, a.forward((x, t[0], y))
    assert torch.equal(out, ref) and torch.equal(out0, ref0)
    assert len(a.units()) == 2


def test_roles_follow_qdit():
    from qwt.models.base import adapter_for
    from qwt.models.dit import DiTGenerator

    a = adapter_for(DiTGenerator(tiny_dit()))
    roles = a.quant_roles()
    blk = "transformer.transformer_blocks.0."
    act = {blk + n for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")}
    assert {n for n, r in roles.items() if n.startswith(blk) and r.quantize_input} == act
    assert not roles[blk + "norm1.linear"].quantize_input  # adaLN: weight-only
    assert not any(".emb." in n or "proj_out" in n or "pos_embed" in n for n in roles)  # embedders / final layer float
    assert all(r.kind == "linear" for r in roles.values())  # attention matmuls float
    assert a.float_layers() >= {"transformer.proj_out_1", "transformer.proj_out_2", "transformer.pos_embed.proj"}


def test_original_dit_numerics():
    """Timestep embedding as the original DiT (frequencies exp(-ln(1e4) i / 128))."""
    from qwt.models.dit import set_original_dit_numerics

    tr = set_original_dit_numerics(tiny_dit())
    t = torch.tensor([0.0, 17.0, 999.0])
    emb = tr.transformer_blocks[0].norm1.emb.time_proj(t)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    ref = torch.cat([torch.cos(args), torch.sin(args)], -1)  # DiT: [cos, sin]
    assert torch.allclose(emb, ref, atol=1e-5)
    assert all(m.eps == 1e-6 for m in tr.modules() if isinstance(m, torch.nn.LayerNorm))


# -- guidance ---------------------------------------------------------------------------------


def test_guidance_guides_the_first_three_channels_only():
    from qwt.models.dit_sampling import guided_eps

    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 8, 4, 4, generator=g)  # [cond; uncond] x (4 eps + 4 sigma channels)
    cond, uncond = out[:2, :4], out[2:, :4]
    e = guided_eps(out, 4, 1.5, 3)
    assert torch.allclose(e[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(e[:, 3], cond[:, 3])  # the original DiT: channel 3 unguided (conditional)
    e_all = guided_eps(out, 4, 1.5, None)
    assert torch.allclose(e_all, uncond + 1.5 * (cond - uncond))


def test_sampler_matches_dit_pipeline_where_they_agree():
    """Our sampler with every channel guided (the pipeline's convention) = diffusers' DiTPipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from qwt.models.base import adapter_for
    from qwt.models.dit import DiTGenerator
    from qwt.models.dit_sampling import Sampler, SamplerConfig, make_scheduler

    tr = tiny_dit(in_ch=4, out_ch=8, classes=1000, size=8, patch=2, layers=1)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, layers_per_block=1).eval()
    cfg = SamplerConfig(num_steps=5, guidance_scale=1.5, guidance_channels=None, clip_sample=False)
    sched = make_scheduler(cfg)
    assert isinstance(sched, DDIMScheduler)
    pipe = DiTPipeline(transformer=tr, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 7]
    ref = pipe(class_labels=labels, guidance_scale=1.5, num_inference_steps=5, generator=torch.Generator().manual_seed(5),
               output_type="pt").images
    gen = DiTGenerator(tr, vae, scaling_factor=vae.config.scaling_factor, num_classes=1000)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a = adapter_for(gen)
    z = Sampler(cfg, 1000).sample(lambda x, t, y: a.forward((x, t, y)), noise, torch.tensor(labels))
    ours = (gen.decode(z) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(ours, ref, atol=1e-5)
    # the original convention (3 of 4 channels) is a different sampler
    z3 = Sampler(SamplerConfig(num_steps=5, guidance_channels=3), 1000).sample(lambda x, t, y: a.forward((x, t, y)), noise, torch.tensor(labels))
    assert not torch.allclose(z3, z)
    # DDIM 50 "leading" visits the original respacing's timesteps 980, 960, ..., 0
    s = make_scheduler(SamplerConfig())
    s.set_timesteps(50)
    assert s.timesteps.tolist() == list(range(980, -1, -20))


# -- Q-DiT quantizer math on a DiT layer --------------------------------------------------------


def test_qdit_gptq_groups_and_dynamic_activations_on_a_dit_layer():
    from qwt.models.base import adapter_for
    from qwt.models.dit import DiTGenerator
    from qwt.ptq import apply_ptq, get_specs
    from qwt.ptq.gptq import gptq_qparams, gptq_quantize
    from qwt.quant import set_quant_state

    model = DiTGenerator(tiny_dit())
    a = adapter_for(model)
    fc2 = a.get("transformer.transformer_blocks.1.ff.net.2")
    W = fc2.weight.detach().clone()  # (128, 512): 4 groups of 128 input columns
    xs = []
    h = fc2.register_forward_pre_hook(lambda m, args: xs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    batches = [batch(8, seed=s) for s in range(2)]
    with torch.no_grad():
        for b in batches:
            a.forward(b)
    h.remove()
    info = apply_ptq(a, get_specs("qdit", 4, 8), batches)
    assert info["gptq_layers"] == 2 * 7  # q, k, v, out, fc1, fc2, adaLN per block
    q = a.get("transformer.transformer_blocks.1.ff.net.2")
    set_quant_state(model, True, False)
    x = xs[0][:5]
    with torch.no_grad():
        Wq = q(torch.eye(512)) - q(torch.zeros(1, 512))  # rows: the dequantized weight's columns
    Wq = Wq.t()
    # every (row, group of 128) holds at most 16 grid values: scale * (k - zero), k in 0..15
    for gi in range(4):
        blk = Wq[:, gi * 128:(gi + 1) * 128]
        assert max(len(torch.unique(r)) for r in blk) <= 16
    # GPTQ's objective beats round-to-nearest on the same groups (H from the layer's own inputs)
    X = torch.cat(xs).float()
    H = 2 * X.t() @ X / len(xs)
    r = gptq_quantize(W, H, 4, group_size=128, damp=0.01)
    rtn = torch.cat([_rtn(W[:, i:i + 128], 4, gptq_qparams) for i in range(0, 512, 128)], 1)
    obj = lambda Q: float(torch.einsum("oi,ij,oj->", W - Q, H, W - Q))  # noqa: E731
    assert obj(r["Q"]) < obj(rtn)
    assert r["scale"].shape == (128, 4)
    # dynamic 8-bit per-token groups of 128 (Q-DiT's rule) at the input
    xq = q.in_quant(x)
    v = x.reshape(-1, 128)
    lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
    s = (hi - lo).clamp_min(1e-5) / 255
    z = torch.clamp(torch.round(-lo / s), 0, 255)
    ref = ((torch.clamp(torch.round(v / s) + z, 0, 255) - z) * s).reshape(x.shape)
    assert torch.allclose(xq, ref, atol=1e-6)


def _rtn(w, bits, qparams):
    scale, zero = qparams(w, bits, False)
    return scale[:, None] * (torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1) - zero[:, None])


# -- end to end (shipped embedded weights) ----------------------------------------------------


def test_embedded_run_end_to_end(tmp_path):
    from qwt.models.shipped import weights_path

    if not weights_path("dit_embedded").is_file() or not weights_path("embedded_fid_cnn").is_file():
        pytest.skip("shipped weights missing: python tools/train_embedded.py dit_embedded / embedded_fid_cnn")
    res = tmp_path / "runs.jsonl"
    common = ["+exp=dit_embedded", f"results.path={res}", f"generation.samples_dir={tmp_path}/samples",
              "generation.num_samples=24", "generation.sample_seeds=[0,1]", "generation.batch_size=12", "generation.chunk_size=12",
              "generation.sampler.num_steps=3", "generation.reference_count=64", "generation.metrics=[fid,isc]",
              "ptq.num_samples=16", "ptq.batch_size=8", "compensation.qwt.num_samples=32", "compensation.qwt_v2.num_samples=32",
              "compensation.qwt.batch_size=16", "compensation.qwt_v2.batch_size=16", f"hydra.run.dir={tmp_path}/run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *common], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in res.read_text().splitlines()]
    assert [row["compensation"] for row in rows] == ["none", "qwt", "qwt_v2"]
    for row in rows:
        m = row["metrics"]
        assert row["task"] == "generation" and row["ptq"] == "qdit" and row["headline"] == "fid"
        assert math.isfinite(m["fid"]) and m["fid"] >= 0 and 1.0 <= m["isc"] <= 10.0 and len(m["fid_seeds"]) == 2
        assert "fid" in row["fp_metrics"]
    assert rows[1]["compensation_info"]["qwt"]["blocks_compensated"] >= 0
    chunks = sorted((tmp_path / "samples").rglob("chunk_*.pt"))
    assert len(chunks) == 4 * 2 * 2  # (fp, none, qwt, qwt_v2) x 2 seeds x 2 chunks
    # resumable: the samples of a finished row are reused, so a recomputation gives the same FID
    r2 = subprocess.run([sys.executable, str(ROOT / "run.py"), *common, "results.skip_finished=false",
                         "compensation.variants=[none]"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resumed" in r2.stdout
    last = json.loads(res.read_text().splitlines()[-1])
    assert last["metrics"]["fid"] == pytest.approx(rows[0]["metrics"]["fid"])


def test_calibration_sets(tmp_path):
    from qwt.models.dit import DiTGenerator
    from qwt.tasks.generation import GenerationTask

    cfg = {"seed": 0, "data": {"name": "digits_wild"}, "exp_name": "t",
           "model": {"name": "x", "data": {"size": 16, "glyph_px": [9, 13], "seed": 0}},
           "generation": {"sampler": {"num_steps": 4, "guidance_channels": None}, "calib_t": [0, 500],
                          "feature_extractor": "embedded_fid_cnn", "reference": "embedded", "samples_dir": str(tmp_path)}}
    task = GenerationTask(cfg, torch.device("cpu"), log=lambda *a: None)
    task.model = DiTGenerator(tiny_dit())
    pts = task.calibration(10, "sampling", 4)
    x = torch.cat([b[0] for b in pts])
    t = torch.cat([b[1] for b in pts])
    y = torch.cat([b[2] for b in pts])
    assert x.shape == (10, 1, 16, 16) and set(t.tolist()) <= {750, 500, 250, 0}
    assert (y[5:] == 10).all() and (y[:5] < 10).all()  # cond + null input of the same trajectory points
    assert torch.equal(x[:5], x[5:])
    real = task.calibration(6, "train", 6)[0]
    assert real[1].tolist() == [0, 500, 0, 500, 0, 500] and real[0][0::2].abs().max() <= 1.05  # t = 0: nearly the image


def test_missing_real_inputs_fail_early(tmp_path):
    from qwt.errors import ConfigError
    from qwt.tasks.generation import GenerationTask

    cfg = {"seed": 0, "data": {"name": "imagenet", "root": None}, "model": {"name": "dit_xl_2"},
           "generation": {"feature_extractor_weights_path": None, "reference": "x.npz"}}
    with pytest.raises(ConfigError, match="feature_extractor_weights_path"):
        GenerationTask(cfg, torch.device("cpu"))
    w = tmp_path / "w.pth"
    w.write_text("")
    cfg["generation"]["feature_extractor_weights_path"] = str(w)
    with pytest.raises(ConfigError, match="generation.reference"):
        GenerationTask(cfg, torch.device("cpu"))
    from qwt.models.dit import build_real_dit

    with pytest.raises(ConfigError, match="model.checkpoint"):
        build_real_dit({"checkpoint": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="DiT-XL-2-256"):
        build_real_dit({"hub_id": "facebook/DiT-XL-2-256"})


def test_real_builder_loads_a_local_pipeline_folder(tmp_path):
    """model.checkpoint = a diffusers DiT folder (transformer/ + vae/), with the original numerics."""
    from diffusers import AutoencoderKL

    from qwt.models.dit import DiTGenerator, build_real_dit

    tr = tiny_dit(in_ch=4, out_ch=8, classes=1000, size=8, patch=2, layers=1)
    tr.save_pretrained(tmp_path / "transformer")
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, layers_per_block=1).save_pretrained(tmp_path / "vae")
    g = build_real_dit({"checkpoint": str(tmp_path)})
    assert isinstance(g, DiTGenerator) and g.vae is not None and g.scaling_factor == 0.18215
    assert g.transformer.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 0
    img = torch.rand(1, 3, 8, 8) * 2 - 1
    assert g.decode(g.encode(img)).shape == img.shape


def test_real_calibration_from_an_imagenet_folder(tmp_path):
    """ImageNet train images: center crop, [-1, 1], VAE-encoded x scale, real labels, t = 0."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from qwt.models.dit import DiTGenerator
    from qwt.tasks.generation import GenerationTask

    for split in ("train", "val"):
        for c in ("n01", "n02"):
            d = tmp_path / "imnet" / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.random.RandomState(i).randint(0, 255, (20, 12, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    (tmp_path / "w.pth").write_text("")
    (tmp_path / "ref").mkdir()
    cfg = {"seed": 0, "data": {"name": "imagenet", "root": str(tmp_path / "imnet")}, "model": {"name": "dit_xl_2"},
           "generation": {"feature_extractor_weights_path": str(tmp_path / "w.pth"), "reference": str(tmp_path / "ref"),
                          "image_size": 8, "samples_dir": str(tmp_path / "s")}}
    task = GenerationTask(cfg, torch.device("cpu"), log=lambda *a: None)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, layers_per_block=1).eval()
    task.model = DiTGenerator(tiny_dit(in_ch=4, out_ch=8, classes=1000, size=8, patch=2, layers=1), vae, 0.18215, 1000)
    (x, t, y), = task.calibration(4, "train", 4)
    assert x.shape == (4, 4, 8, 8) and t.tolist() == [0] * 4 and sorted(y.tolist()) == [0, 0, 1, 1]
