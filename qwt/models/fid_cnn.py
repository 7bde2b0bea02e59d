"""A small CNN classifier of the embedded image benchmark (digits in the wild), used as the feature
extractor of torch-fidelity for the embedded generation metrics (no Inception download): FID and
precision/recall on its 128-d pooled features, IS on its 10 logits.

Trained once by ``python tools/train_embedded.py embedded_fid_cnn`` (shipped weights); registered
with torch-fidelity as ``embedded_fid_cnn`` by ``register()``.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "embedded_fid_cnn"


class DigitsCNN(nn.Module):
    def __init__(self, in_chans: int = 1, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(in_chans, w), block(w, w), nn.MaxPool2d(2), block(w, 2 * w), block(2 * w, 2 * w),
                                  nn.MaxPool2d(2), block(2 * w, 4 * w))
        self.fc = nn.Linear(4 * w, num_classes)

    def features(self, x):
        return self.body(x).mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def train_fid_cnn(cfg: dict, log=print) -> tuple[dict, dict]:
    from ..data.digits_wild import to_float
    from .dit import embedded_images

    tc = cfg["train"]
    torch.manual_seed(int(tc["seed"]))
    model = DigitsCNN(**dict(cfg.get("kwargs") or {}))
    x, y = embedded_images(cfg["data"], "train", int(tc["train_images"]))
    xe, ye = embedded_images(cfg["data"], "eval", 2000)
    x, xe = to_float(x), to_float(xe)
    opt = torch.optim.AdamW(model.parameters(), lr=float(tc["lr"]), weight_decay=5e-4)
    steps, bs = int(tc["steps"]), int(tc["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(tc["lr"]), total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(int(tc["seed"]))
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (bs,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    with torch.no_grad():
        acc = float((model(xe).argmax(-1) == ye).float().mean()) * 100
    log(f"eval top-1 {acc:.2f}")
    return model.state_dict(), {"eval_top1": round(acc, 2)}


_CFG: dict = {}


def load_cnn() -> DigitsCNN:
    from pathlib import Path

    import yaml

    from .shipped import load_shipped

    if not _CFG:
        path = Path(__file__).resolve().parents[2] / "configs" / "model" / f"{NAME}.yaml"
        _CFG.update(yaml.safe_load(path.read_text()))
    state, _ = load_shipped(NAME)
    m = DigitsCNN(**dict(_CFG.get("kwargs") or {}))
    m.load_state_dict(state)
    return m.eval()


def register() -> str:
    """Register the shipped CNN with torch-fidelity (idempotent); returns its name."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if NAME in FEATURE_EXTRACTORS_REGISTRY:
        return NAME

    class EmbeddedFidCNN(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = load_cnn()

        @staticmethod
        def get_provided_features_list():
            return ("pool", "logits_unbiased", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            x = x.float() / 127.5 - 1.0
            if x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            f = self.net.features(x)
            logits = self.net.fc(f)
            out = {"pool": f.double(), "logits_unbiased": logits.double(), "logits": logits.double()}
            return tuple(out[k] for k in self.features_list)

    register_feature_extractor(NAME, EmbeddedFidCNN)
    return NAME
