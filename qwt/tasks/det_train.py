"""Training of the embedded detector with mmdet's own runner (an explicit, one-time command):

    python tools/train_embedded.py det_embedded

mmengine's ``Runner`` with an ``IterBasedTrainLoop`` over the generated shapes set's train2017
(mmdet's ``CocoDataset``, ``LoadAnnotations`` with masks, random flip), AdamW with a linear
warm-up and a cosine decay, seeded. No checkpoint files are written: the trained state dict is
returned to ``tools/train_embedded.py``, which stores it (float16) as shipped weights.
"""
from __future__ import annotations

import tempfile
import time


def train_embedded(model_cfg: dict, log=print):
    from mmengine.runner import Runner

    from ..data.det_shapes import CLASSES
    from ..models.mmdet_zoo import load_config
    from .detection import data_root

    import torch

    tc = model_cfg["train"]
    cfg = load_config(model_cfg)
    root = data_root(dict(tc["data"]))
    pipeline = [dict(type="LoadImageFromFile"),
                dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
                dict(type="RandomFlip", prob=0.5),
                dict(type="PackDetInputs")]
    loader = dict(batch_size=int(tc["batch_size"]), num_workers=0, persistent_workers=False,
                  sampler=dict(type="InfiniteSampler", shuffle=True, seed=int(tc["seed"])),
                  dataset=dict(type="CocoDataset", data_root=root, ann_file="annotations/instances_train2017.json",
                               data_prefix=dict(img="train2017/"), metainfo=dict(classes=CLASSES),
                               filter_cfg=dict(filter_empty_gt=True, min_size=2), pipeline=pipeline))
    iters = int(tc["iters"])
    warm = min(100, iters // 10)
    with tempfile.TemporaryDirectory() as work:
        runner = Runner(
            model=cfg.model, work_dir=work, train_dataloader=loader,
            train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters),
            optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=float(tc["lr"]), betas=(0.9, 0.999),
                                                                   weight_decay=float(tc.get("weight_decay", 0.05))),
                               clip_grad=dict(max_norm=10.0)),
            param_scheduler=[dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=warm),
                             dict(type="CosineAnnealingLR", by_epoch=False, begin=warm, end=iters, eta_min=float(tc["lr"]) * 0.02)],
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=10**9, save_last=False, by_epoch=False),
                               logger=dict(type="LoggerHook", interval=int(tc.get("log_interval", 50)))),
            randomness=dict(seed=int(tc["seed"]), deterministic=False),
            default_scope="mmdet", log_level="INFO",
            env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
        )
        t0 = time.time()
        runner.train()
        seconds = time.time() - t0
        model = runner.model
        model.eval()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    info = {"iters": iters, "batch_size": int(tc["batch_size"]), "train_loop_seconds": round(seconds, 1),
            "dataset_root_key": str(root).rsplit("/", 1)[-1], "torch_threads": torch.get_num_threads()}
    return state, info
