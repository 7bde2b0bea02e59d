"""Build mmdet detectors (``model.source: mmdet`` / ``mmdet_embedded``).

``model.mmdet_config`` names an mmdet 3 config: ``mmdet::<path>`` (a config shipped inside the mmdet
package, e.g. ``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py``) or ``qwt::<file>`` (one
of ``qwt/models/mmdet_configs/``: the Cascade Mask R-CNN Swin configs composed as in the QwT
reference, the embedded detector). Backbone pretraining (``init_cfg``) is switched off: the whole
detector's weights come from ``model.checkpoint`` (mmdet 3 or the reference's mmdet 2 layout,
``qwt/models/mmdet_ckpt.py``) or, for the embedded model, from the shipped weights.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "mmdet_configs"


def require_mmdet():
    try:
        import mmcv.ops  # noqa: F401  (mmdet imports the compiled ops at import time)
        import mmdet  # noqa: F401
    except ImportError as e:
        raise ConfigError("the detection family needs mmdet 3.3.0, mmengine 0.10.x and mmcv 2.1.0 with its ops: "
                          f"run scripts/bootstrap.sh (it builds mmcv once and caches the wheel) ({e})") from e


def config_path(name: str) -> str:
    if name.startswith("qwt::"):
        p = CONFIG_DIR / name[len("qwt::"):]
        if not p.is_file():
            raise ConfigError(f"model.mmdet_config={name}: no such file {p} (files: {sorted(x.name for x in CONFIG_DIR.glob('*.py'))})")
        return str(p)
    if name.startswith("mmdet::"):  # a config shipped inside the mmdet package (mmdet/.mim/configs/)
        import mmdet

        p = Path(mmdet.__file__).resolve().parent / ".mim" / "configs" / name[len("mmdet::"):]
        if not p.is_file():
            raise ConfigError(f"model.mmdet_config={name}: mmdet {mmdet.__version__} ships no such config ({p})")
        return str(p)
    return name  # a path


def load_config(model_cfg: dict):
    require_mmdet()
    from mmengine import Config

    name = model_cfg.get("mmdet_config")
    if not name:
        raise ConfigError("model.mmdet_config is not set (an mmdet 3 config: mmdet::<path> or qwt::<file>)")
    try:
        cfg = Config.fromfile(config_path(str(name)))
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"model.mmdet_config={name}: cannot read it ({e})") from e
    bb = cfg.model.get("backbone", {})
    if "init_cfg" in bb:
        bb["init_cfg"] = None  # no pretrained download: the detector checkpoint has every weight
    for k, v in (model_cfg.get("mmdet_overrides") or {}).items():
        cfg.merge_from_dict({k: v})
    return cfg


def build_detector(model_cfg: dict) -> nn.Module:
    """The float detector of ``model.mmdet_config`` with freshly initialised weights."""
    cfg = load_config(model_cfg)
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    model = MODELS.build(cfg.model)
    return model


def build_mmdet(model_cfg: dict, log=print) -> nn.Module:
    ckpt = model_cfg.get("checkpoint")
    if not ckpt:
        raise ConfigError(f"model.checkpoint is not set: {model_cfg['name']} needs its trained detector weights. "
                          f"Download {model_cfg.get('checkpoint_hint', 'the checkpoint')} and set model.checkpoint=/path/to/file.pth")
    from .mmdet_ckpt import load_checkpoint_file  # noqa: F401  (fail on a missing file before building)

    import os

    if not os.path.isfile(str(ckpt)):
        raise ConfigError(f"model.checkpoint={ckpt} does not exist: download {model_cfg.get('checkpoint_hint', 'the checkpoint')} "
                          "and point model.checkpoint at it")
    from .mmdet_ckpt import load_detector_weights

    model = build_detector(model_cfg)
    layout = load_detector_weights(model, str(ckpt), trust=bool(model_cfg.get("trust_checkpoint", False)),
                                   layout=model_cfg.get("checkpoint_layout", "auto"))
    log(f"[qwt] loaded {model_cfg['name']} from {ckpt} ({layout} layout)")
    return model.eval()


def build_mmdet_embedded(model_cfg: dict, log=print) -> nn.Module:
    from .shipped import load_shipped

    state, _ = load_shipped(model_cfg["name"])
    model = build_detector(model_cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()
