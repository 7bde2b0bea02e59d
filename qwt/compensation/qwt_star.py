"""QwT*: QwT, then train only the compensation branches and the task head for ``epochs`` over the
training set with the task's supervised loss (classification: cross-entropy) + ``mse_weight`` x
MSE(quantized features, float features) (the adapter's ``features``: pre-head features); AdamW,
weight decay 0, constant lr (reference default 5e-7), no mixup. ``max_steps`` (optional) caps the
number of optimizer steps (the embedded default: a PTQ-sized budget on its 32k training images)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import dist
from ..engine import run_chain
from ..errors import ConfigError
from ..quant import set_quant_state
from . import qwt
from .base import CompContext


def apply(ctx: CompContext, cfg: dict) -> dict:
    adapter, fp = ctx.adapter, ctx.fp_adapter
    if ctx.train_batches is None or ctx.supervised_loss is None:
        raise ConfigError("compensation qwt_star needs a task with labelled training data (a supervised loss); "
                          "this task has none: use qwt or qft")
    info = {}
    if not any(isinstance(m, qwt.QwTBlock) for m in adapter.model.modules()):
        info["qwt"] = qwt.apply(ctx, cfg["qwt"])
    params = [p for m in adapter.model.modules() if isinstance(m, qwt.QwTBlock) for p in m.branch.parameters()]
    for name in adapter.trainable_head():
        params += list(adapter.get(name).parameters())
    trainable = {id(p) for p in params}
    for p in adapter.model.parameters():
        p.requires_grad_(id(p) in trainable)
    for m in adapter.model.modules():  # the head's latent weights train; keep the float path fixed
        if hasattr(m, "detach_fp") and any(id(p) in trainable for p in m.parameters(recurse=False)):
            m.detach_fp()
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay", 0.0)))
    set_quant_state(adapter.model, True, True)
    adapter.model.eval()  # BN / dropout in inference mode: only the chosen parameters change
    losses = []
    max_steps = cfg.get("max_steps")
    for _ in range(int(cfg["epochs"])):
        if max_steps is not None and len(losses) >= int(max_steps):
            break
        for x, y in tqdm(ctx.train_batches(int(cfg["batch_size"])), desc="qwt*", disable=not dist.is_main(), leave=False):
            if max_steps is not None and len(losses) >= int(max_steps):
                break
            with torch.no_grad():
                f_fp = fp.features(run_chain(fp, x)[0])
            s, _ = run_chain(adapter, x)
            f_q = adapter.features(s)
            out = adapter.head(s)
            loss = ctx.supervised_loss(out, y) + float(cfg["mse_weight"]) * F.mse_loss(f_q, f_fp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in params:
                if p.grad is not None:
                    dist.all_reduce_sum(p.grad)
                    p.grad /= dist.world()
            opt.step()
            losses.append(float(loss.detach()))
    for p in adapter.model.parameters():
        p.requires_grad_(True)
    info.update(trainable_params=sum(p.numel() for p in params), steps=len(losses),
                loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None)
    return info
