"""Build the float model named by the model config (``model.source``): timm hub / local
checkpoints, the embedded models trained here, or a family's own builder registered in
``SOURCES`` (imported only when that source is used)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

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
    "embedded": "qwt.models.zoo:load_or_train_embedded",
    "diffusers_dit": "qwt.models.dit:build_real_dit",
    "embedded_dit": "qwt.models.dit:build_embedded_dit",
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


def embedded_cache_path(model_cfg: dict) -> Path:
    key = json.dumps({k: model_cfg[k] for k in ("arch", "kwargs", "train", "input_size")}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache = Path(os.path.expanduser(str(model_cfg.get("cache_dir") or "~/.cache/qwt")))
    return cache / f"{model_cfg['name']}-{digest}.pt"


def load_or_train_embedded(model_cfg: dict, log=print) -> nn.Module:
    path = embedded_cache_path(model_cfg)
    with torch.random.fork_rng(devices=[]):  # initialization seeded too; the caller's RNG untouched
        torch.manual_seed(int(model_cfg["train"]["seed"]))
        model = embedded_arch(model_cfg)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model
    log(f"[qwt] training embedded model {model_cfg['name']} (once; cached at {path})")
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        train_embedded(model, model_cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    log(f"[qwt] trained {model_cfg['name']} in {time.time() - t0:.1f}s")
    return model


def train_embedded(model: nn.Module, model_cfg: dict) -> None:
    """Deterministic training on the digits training split (AdamW, one-cycle, label smoothing)."""
    tc = model_cfg["train"]
    # float reductions depend on the thread count: train with a fixed one so the model is the same
    # on every machine with the same torch build (it is part of the cache key)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(tc.get("threads", 1)))
    try:
        _train(model, tc, model_cfg)
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, tc: dict, model_cfg: dict) -> None:
    from torch.utils.data import DataLoader

    from ..tasks.classification import DigitsDataset, digits_split

    torch.manual_seed(int(tc["seed"]))
    (xtr, ytr), _ = digits_split()
    ds = DigitsDataset(xtr, ytr, int(model_cfg["input_size"][-1]), train_aug=True, seed=int(tc["seed"]))
    loader = DataLoader(ds, batch_size=int(tc["batch_size"]), shuffle=True, generator=torch.Generator().manual_seed(int(tc["seed"])))
    opt = torch.optim.AdamW(model.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
    steps = int(tc["epochs"]) * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(tc["lr"]), total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(int(tc["epochs"])):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
