"""Shipped weights of the embedded models: trained once by an explicit command
(``python tools/train_embedded.py <model config name>``), committed to the repository under
``qwt/models/weights/<name>.pt`` beside ``<name>.json`` (the recipe, the training log and the
file's sha256). Every machine then runs the same weights; a run never trains as a side effect.

Tensors are stored in float16 when the model config says ``weights_dtype: float16`` (enough for
small models; loaded back as float32), else float32.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import ConfigError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_shipped(name: str, state: dict, recipe: dict, log: dict | None = None, dtype: str = "float32") -> Path:
    """Write ``state`` (a state dict) and its sidecar; returns the weights path."""
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    dt = {"float16": torch.float16, "float32": torch.float32}[dtype]
    out = {k: (v.detach().to(dt) if v.is_floating_point() else v.detach()).cpu().contiguous() for k, v in state.items()}
    path = weights_path(name)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(out, tmp)
    os.replace(tmp, path)
    meta = {"name": name, "file": path.name, "sha256": file_sha256(path), "dtype": dtype, "recipe": recipe,
            "training": log or {}, "torch": torch.__version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return path


def load_shipped(name: str) -> tuple[dict, dict]:
    """(state dict in float32, sidecar metadata). A missing or altered file is a clear error."""
    path = weights_path(name)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ConfigError(f"the embedded model '{name}' has no shipped weights ({path} missing): "
                          f"train them once with: python tools/train_embedded.py {name}")
    meta = json.loads(meta_path.read_text())
    digest = file_sha256(path)
    if digest != meta.get("sha256"):
        raise ConfigError(f"{path} does not match the sha256 recorded in {meta_path.name} ({digest[:12]} vs "
                          f"{str(meta.get('sha256'))[:12]}): restore it with git checkout, or retrain with "
                          f"python tools/train_embedded.py {name}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, meta
