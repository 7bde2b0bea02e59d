"""COCO detection and instance segmentation (mmdet 3): data, calibration batches, ``CocoMetric``.

Data (``data.root``): the COCO 2017 layout
    annotations/instances_train2017.json, annotations/instances_val2017.json, train2017/, val2017/
(``data.name=coco``), or the embedded shapes set generated in that same layout
(``data.name=det_shapes``, ``qwt/data/det_shapes.py``).

Evaluation: mmdet's test pipeline (``LoadImageFromFile``, ``Resize`` to ``data.test_scale`` with
keep-ratio, ``PackDetInputs``), the detector's own data preprocessor (normalize, pad to a multiple
of 32), the adapter's block walk (``stem`` -> units -> ``head``), and mmdet's ``CocoMetric`` with
``metric=[bbox, segm]``. Rows record AP, AP50, AP75, APs, APm, APl for boxes and masks (percent).

Calibration batches (``calibration(n, transform, ...)``, the reference protocol):
  eval   the first ``n`` val2017 images through the test pipeline (RepQ-ViT: n = 1);
  train  ``n`` train2017 images (seeded draw) resized to ``data.calib_size`` without keeping the
         aspect ratio (QwT: 224x224), normalised and padded to a multiple of 32;
         ``data.calib_size=null`` uses the test pipeline instead (full-resolution calibration).
A batch is the dict of tensors ``qwt/models/mmdet_swin.py`` describes.
"""
from __future__ import annotations

import os
import time

import torch

from .. import dist
from ..errors import ConfigError
from .base import Task

COCO_LAYOUT = ("<root>/annotations/instances_train2017.json, <root>/annotations/instances_val2017.json, "
               "<root>/train2017/*.jpg, <root>/val2017/*.jpg")
METRIC_KEYS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def check_coco_root(root) -> None:
    if root is None or str(root) in ("", "???"):
        raise ConfigError(f"data.root is not set. Point it at COCO 2017: python run.py ... data.root=/path/to/coco; "
                          f"expected layout: {COCO_LAYOUT}")
    need = ["annotations/instances_train2017.json", "annotations/instances_val2017.json", "train2017", "val2017"]
    missing = [p for p in need if not os.path.exists(os.path.join(str(root), p))]
    if missing:
        raise ConfigError(f"data.root={root}: missing {', '.join(missing)}. Expected layout: {COCO_LAYOUT}. "
                          "Set data.root to the folder that holds annotations/, train2017/ and val2017/")


def data_root(data_cfg: dict) -> str:
    name = data_cfg["name"]
    if name == "coco":
        check_coco_root(data_cfg.get("root"))
        return str(data_cfg["root"])
    if name == "det_shapes":
        from ..data.det_shapes import ensure_dataset

        g = data_cfg.get("generate") or {}
        return str(ensure_dataset(data_cfg.get("cache_dir") or "~/.cache/qwt", int(g.get("n_train", 2000)),
                                  int(g.get("n_val", 300)), int(g.get("size", 128)), int(g.get("seed", 0))))
    raise ConfigError(f"unknown data.name={name!r} for task=detection: use coco or det_shapes (configs/data/)")


def test_pipeline(scale) -> list:
    return [dict(type="LoadImageFromFile"),
            dict(type="Resize", scale=tuple(int(s) for s in scale), keep_ratio=True),
            dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]


def calib_pipeline(size) -> list:
    """The QwT reference's calibration images: resized to ``size`` (w, h) without keeping the aspect ratio."""
    return [dict(type="LoadImageFromFile"),
            dict(type="Resize", scale=tuple(int(s) for s in size), keep_ratio=False),
            dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]


def coco_dataset(root: str, split: str, pipeline: list):
    from mmdet.datasets import CocoDataset

    import json

    ann = os.path.join(root, "annotations", f"instances_{split}2017.json")
    metainfo = None
    if not os.path.basename(root.rstrip("/")).startswith("coco") or True:
        # classes from the annotation file itself (COCO's 80 names, or the embedded set's)
        with open(ann) as f:
            head = json.load(f)["categories"]
        metainfo = {"classes": tuple(c["name"] for c in sorted(head, key=lambda c: c["id"]))}
    return CocoDataset(ann_file=ann, data_root=root, data_prefix=dict(img=f"{split}2017/"), test_mode=True,
                       pipeline=pipeline, metainfo=metainfo, filter_cfg=None, backend_args=None)


class DetectionTask(Task):
    """Box and mask AP (mmdet ``CocoMetric``) over val2017 (or a fixed subset, ``data.val_subset``)."""

    name = "detection"
    headline = "bbox_mAP"
    # printed columns (rows record AP, AP50, AP75, APs, APm, APl for boxes and masks)
    table_columns = tuple([(f"bbox_{k}", f"box {k.replace('mAP', 'AP').replace('_', '')}", "{:.1f}") for k in METRIC_KEYS[:3]]
                          + [(f"segm_{k}", f"mask {k.replace('mAP', 'AP').replace('_', '')}", "{:.1f}") for k in METRIC_KEYS[:3]])

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        from ..models.mmdet_zoo import require_mmdet

        require_mmdet()
        from mmdet.utils import register_all_modules

        register_all_modules(init_default_scope=True)
        self.dcfg = cfg["data"]
        self.rt = cfg.get("runtime", {})
        self.root = data_root(self.dcfg)
        self.val = coco_dataset(self.root, "val", test_pipeline(self.dcfg.get("test_scale", (1333, 800))))
        self._train = None
        self._preprocessor = None
        n = self.dcfg.get("val_subset")
        self.val_idx = list(range(len(self.val))) if n is None else list(range(min(int(n), len(self.val))))

    # -- model ----------------------------------------------------------------------------
    def build_model(self):
        model = super().build_model()
        self._preprocessor = model.data_preprocessor
        return model

    def preprocessor(self):
        if self._preprocessor is None:
            raise RuntimeError("build the model before asking for batches (its data preprocessor normalises)")
        return self._preprocessor

    # -- batches --------------------------------------------------------------------------
    def _batch(self, items: list) -> tuple[dict, list]:
        from ..models.mmdet_swin import metas_from_samples

        data = self.preprocessor()({"inputs": [it["inputs"] for it in items],
                                    "data_samples": [it["data_samples"] for it in items]}, False)
        samples = data["data_samples"]
        batch = {"inputs": data["inputs"].to(self.device)}
        batch.update({k: v.to(self.device) for k, v in metas_from_samples(samples).items()})
        return batch, samples

    def train_set(self):
        if self._train is None:
            size = self.dcfg.get("calib_size", (224, 224))
            pipe = test_pipeline(self.dcfg.get("test_scale", (1333, 800))) if size is None else calib_pipeline(size)
            t0 = time.time()
            self._train = coco_dataset(self.root, "train", pipe)
            self.log(f"[qwt] train2017 index: {len(self._train)} images ({time.time() - t0:.1f}s)")
        return self._train

    def num_calibration_samples(self):
        return None  # train2017 is read lazily (its index is large); a too-large n fails when drawn

    def calibration(self, n, transform, batch_size, shard=False):
        if transform == "eval":
            ds, idx = self.val, list(range(min(int(n), len(self.val))))
            if n > len(self.val):
                raise ConfigError(f"asked for {n} calibration images but val2017 has {len(self.val)}")
        elif transform == "train":
            ds = self.train_set()
            if n > len(ds):
                raise ConfigError(f"asked for {n} calibration images but train2017 has {len(ds)}; lower num_samples")
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(ds), generator=g)[: int(n)].tolist()
        else:
            raise ConfigError(f"calibration transform must be 'train' or 'eval', got {transform!r}")
        if shard:
            idx = [idx[i] for i in dist.shard(list(range(len(idx))))]
        out = []
        for s in range(0, len(idx), int(batch_size)):
            out.append(self._batch([ds[i] for i in idx[s: s + int(batch_size)]])[0])
        return out

    # -- QwT* (distillation on backbone features only) -----------------------------------
    def supervised_loss(self, out, target):
        """QwT* on detection trains the branches by the feature distillation term alone (the issue's
        reading: "QwT* with a distillation loss on backbone features"); no detection loss."""
        return torch.zeros((), device=self.device)

    def train_batches(self, batch_size):
        """One epoch over train2017 (or its first ``data.train_subset`` images of a seeded shuffle),
        calibration pipeline (224x224 by default); targets are unused (``None``)."""
        ds = self.train_set()
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(ds), generator=g).tolist()
        n = self.dcfg.get("train_subset")
        if n is not None:
            idx = idx[: int(n)]
        for s in range(0, len(idx), int(batch_size)):
            yield self._batch([ds[i] for i in idx[s: s + int(batch_size)]])[0], None

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, adapter, reference=None, desc="eval"):
        from mmdet.evaluation import CocoMetric
        from tqdm.auto import tqdm

        metric = CocoMetric(ann_file=os.path.join(self.root, "annotations", "instances_val2017.json"),
                            metric=["bbox", "segm"], format_only=False, backend_args=None)
        metric.dataset_meta = self.val.metainfo
        bs = int(self.rt.get("eval_batch_size", 1))
        idx = dist.shard(list(self.val_idx))
        img_ids = []
        for s in tqdm(range(0, len(idx), bs), desc=desc, disable=not dist.is_main(), leave=False):
            batch, samples = self._batch([self.val[i] for i in idx[s: s + bs]])
            preds = adapter.forward(batch)
            outs = []
            for smp, p in zip(samples, preds):
                img_ids.append(smp.metainfo["img_id"])
                outs.append({"img_id": smp.metainfo["img_id"], "ori_shape": smp.metainfo["ori_shape"],
                             "pred_instances": {"bboxes": p.bboxes.cpu(), "scores": p.scores.cpu(),
                                                "labels": p.labels.cpu(), "masks": p.masks.cpu()}})
            metric.process({}, outs)
        if dist.world() > 1:
            all_ids = [self.val[i]["data_samples"].metainfo["img_id"] for i in self.val_idx]
        else:
            all_ids = img_ids
        metric.img_ids = sorted(all_ids)
        import logging

        from mmengine.logging import MMLogger

        import contextlib
        import io

        MMLogger.get_current_instance().setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its summary tables
            res = metric.evaluate(len(self.val_idx))
        metrics = {}
        for kind in ("bbox", "segm"):
            for k in METRIC_KEYS:
                v = res.get(f"coco/{kind}_{k}")
                metrics[f"{kind}_{k}"] = None if v is None or v < 0 else 100.0 * float(v)
        metrics["num_images"] = len(self.val_idx)
        return metrics, None
