"""Build the float model named by the model config (``model.source``): timm hub / local
checkpoints, the embedded models (shipped weights), or a family's own builder registered in
``SOURCES`` (imported only when that source is used)."""
from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError


def disable_fused_attention(model: nn.Module) -> nn.Module:
    """Make timm attention run its explicit matmuls, so FP and 'quantization off' compute the same ops."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


# model.source -> "module:function(model_cfg, log) -> nn.Module"
SOURCES = {
    "timm": "qwt.models.zoo:build_timm",
    "embedded": "qwt.models.zoo:load_embedded",
    "open_clip": "qwt.models.open_clip:build_clip_module",
    "open_clip_embedded": "qwt.models.open_clip:build_clip_module",
    "hf_llama": "qwt.models.hf_llama:build_llama",  # transformers LlamaForCausalLM: checkpoints and the embedded LLaMA
}


def build_model(model_cfg: dict, log=print) -> nn.Module:
    import importlib

    source = model_cfg["source"]
    if source not in SOURCES:
        raise ConfigError(f"model.source={source!r} is unknown: use one of {sorted(SOURCES)}")
    mod, _, fn = SOURCES[source].partition(":")
    model = getattr(importlib.import_module(mod), fn)(model_cfg, log=log)
    return disable_fused_attention(model.eval())


def build_timm(model_cfg: dict, log=print) -> nn.Module:
    import timm

    name, ckpt = model_cfg["timm_name"], model_cfg.get("checkpoint")
    if ckpt:
        if not os.path.isfile(str(ckpt)):
            raise ConfigError(f"model.checkpoint={ckpt} does not exist: give the path of a {name} weights file (.pth/.safetensors/.bin)")
        model = timm.create_model(name, pretrained=False, num_classes=model_cfg.get("num_classes", 1000))
        try:
            state = timm.models.load_state_dict(str(ckpt))
        except Exception as e:  # not a checkpoint (corrupt, truncated, another format)
            raise ConfigError(f"model.checkpoint={ckpt} is not a readable weights file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}): give a {name} checkpoint (.pth/.safetensors/.bin)") from e
        missing, unexpected = check_state_keys(model, state)
        if missing or unexpected:
            raise ConfigError(f"model.checkpoint={ckpt} does not fit model.timm_name={name}: "
                              f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
                              f"(e.g. {unexpected[:3]}). Give the checkpoint of this architecture, or choose the model= that matches it")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # shapes differ (e.g. another width or number of classes)
            msg = [l.strip() for l in str(e).splitlines() if "size mismatch" in l][:2]
            raise ConfigError(f"model.checkpoint={ckpt} does not fit model.timm_name={name}: {'; '.join(msg) or str(e)[:200]}. "
                              "Give the checkpoint of this architecture (and model.num_classes)") from e
        return model
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") and not hub_reachable():
        raise ConfigError(
            f"timm model '{name}' needs pretrained weights but huggingface.co is unreachable (no network). "
            f"Download the weights elsewhere and set model.checkpoint=/path/to/{name}.safetensors "
            "(or set HF_HUB_OFFLINE=1 if they are already in your Hugging Face cache)"
        )
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as e:  # no network / hub unreachable / not cached
        raise ConfigError(
            f"could not load pretrained weights of timm model '{name}' from the hub ({type(e).__name__}: {str(e)[:200]}). "
            f"Without network, download the weights elsewhere and set model.checkpoint=/path/to/{name}.safetensors"
        ) from e


def check_state_keys(model: nn.Module, state: dict) -> tuple[list, list]:
    """(missing, unexpected) keys of ``state`` for ``model`` (buffers that are not saved excluded)."""
    want = set(model.state_dict())
    have = set(state)
    return sorted(want - have), sorted(have - want)


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# embedded models


def embedded_arch(model_cfg: dict) -> nn.Module:
    kw = dict(model_cfg["kwargs"])
    if model_cfg["arch"] == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**kw)
    if model_cfg["arch"] == "resnet":
        from timm.models.resnet import BasicBlock, Bottleneck, ResNet

        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[kw.pop("block", "basic")]
        kw["channels"] = tuple(kw["channels"])
        return ResNet(block=block, **kw)
    raise ConfigError(f"model.arch={model_cfg['arch']!r} is unknown for embedded models: use vit or resnet")


def load_embedded(model_cfg: dict, log=print) -> nn.Module:
    """An embedded model with its shipped weights (``qwt/models/weights/``; never trained here:
    ``python tools/train_embedded.py <name>`` retrains explicitly)."""
    from .shipped import load_shipped

    state, meta = load_shipped(model_cfg["name"])
    model = embedded_arch(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"the shipped weights of {model_cfg['name']} do not fit configs/model/{model_cfg['name']}.yaml "
                          f"(architecture changed since training?): retrain with python tools/train_embedded.py "
                          f"{model_cfg['name']}  ({str(e).splitlines()[0][:160]})") from e
    return model


def train_embedded_classifier(model_cfg: dict, log=print) -> tuple[dict, dict]:
    """Train an embedded classifier on the generated benchmark (``train.data``: the data config it
    trains on; AdamW, one-cycle, label smoothing, seeded, the config's thread count). The
    trainer entry of ``tools/train_embedded.py``; returns (state dict, training log)."""
    from torch.utils.data import DataLoader

    from ..tasks.classification import build_data, evaluate

    tc = model_cfg["train"]
    data = build_data(dict(tc["data"], val_subset=None), model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tc["seed"]))
        model = embedded_arch(model_cfg)
        loader = DataLoader(data.train, batch_size=int(tc["batch_size"]), shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(int(tc["seed"])))
        opt = torch.optim.AdamW(model.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
        steps = int(tc["epochs"]) * len(loader)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(tc["lr"]), total_steps=steps, pct_start=float(tc.get("warmup", 0.1)))
        history = []
        t0 = time.time()
        for ep in range(int(tc["epochs"])):
            model.train()
            tot, n = 0.0, 0
            for x, y in loader:
                loss = F.cross_entropy(model(x), y, label_smoothing=float(tc.get("label_smoothing", 0.1)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot, n = tot + float(loss) * len(y), n + len(y)
            model.eval()
            top1 = evaluate(model, data, 512, "cpu")[0]["top1"] if (ep + 1) % int(tc.get("eval_every", 1)) == 0 or ep + 1 == int(tc["epochs"]) else None
            history.append({"epoch": ep + 1, "train_loss": round(tot / max(1, n), 4), "eval_top1": top1, "seconds": round(time.time() - t0, 1)})
            log(f"[train {model_cfg['name']}] epoch {ep + 1}/{tc['epochs']} loss {tot / max(1, n):.4f}"
                + (f" eval top-1 {top1:.2f}" if top1 is not None else "") + f" ({time.time() - t0:.0f}s)")
    model.eval()
    return model.state_dict(), {"history": history, "eval_top1": history[-1]["eval_top1"], "steps": steps}
