"""Image classification: data (embedded digits or an ImageNet folder) and the top-1 evaluator.

ImageNet uses timm's data pipeline (``timm.data.ImageDataset`` + ``create_transform``) with the
per-family preprocessing of the model config (mean, std, crop_pct, interpolation). A batch (what
the adapter's stem consumes) is an image tensor.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .. import dist
from ..errors import ConfigError
from .base import Task

IMAGENET_LAYOUT = (
    "<root>/train/<class_id>/*.JPEG (e.g. train/n01440764/...) and <root>/val/<class_id>/*.JPEG "
    "(validation images sorted into the same 1000 class folders)"
)


# ---------------------------------------------------------------------------------------------
# embedded digits (scikit-learn ships them): 1797 8x8 grey images, 10 classes


class DigitsDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, train_aug: bool, seed: int = 0):
        self.images, self.labels, self.size, self.train_aug = images, labels, size, train_aug
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]  # (1, 8, 8) in [-1, 1]
        if self.train_aug:  # random shift of up to 1 pixel
            dx, dy = torch.randint(-1, 2, (2,), generator=self.gen).tolist()
            x = torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), shifts=(dy, dx), dims=(1, 2))[:, 1:-1, 1:-1]
        if self.size != 8:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return x, int(self.labels[i])


def digits_split(val_fraction: float = 0.25, seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    return (x[train], y[train]), (x[val], y[val])


# ---------------------------------------------------------------------------------------------


@dataclass
class ClassificationData:
    train: Dataset  # with the training transform
    train_eval_tf: Dataset  # same images, evaluation transform
    val: Dataset
    name: str


def check_imagenet_root(root) -> None:
    if root is None or str(root) in ("", "???"):
        raise ConfigError(f"data.root is not set. Point it at an ImageNet folder: python run.py ... data.root=/path/to/imagenet; expected layout: {IMAGENET_LAYOUT}")
    classes = {}
    for split in ("train", "val"):
        p = os.path.join(str(root), split)
        if not os.path.isdir(p):
            raise ConfigError(f"data.root={root}: missing folder '{split}/'. Expected layout: {IMAGENET_LAYOUT}. Set data.root to the folder that holds train/ and val/.")
        entries = list(os.scandir(p))
        dirs = sorted(e.name for e in entries if e.is_dir())
        loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith((".jpeg", ".jpg", ".png"))]
        if not dirs:
            what = f"{len(loose)} images lie directly in it" if loose else "it holds no class folders"
            raise ConfigError(f"data.root={root}: '{split}/' must hold one folder per class, but {what}. "
                              f"Expected layout: {IMAGENET_LAYOUT} (sort validation images into their class folders)")
        classes[split] = dirs
    if classes["train"] != classes["val"]:
        only_t = sorted(set(classes["train"]) - set(classes["val"]))
        only_v = sorted(set(classes["val"]) - set(classes["train"]))
        raise ConfigError(f"data.root={root}: train/ and val/ must have the same class folders (labels are their sorted order); "
                          f"only in train/: {only_t[:3]}{'...' if len(only_t) > 3 else ''} ({len(only_t)}), "
                          f"only in val/: {only_v[:3]}{'...' if len(only_v) > 3 else ''} ({len(only_v)})")


def build_data(data_cfg, model_cfg) -> ClassificationData:
    kind = data_cfg["name"]
    if kind == "digits":
        (xtr, ytr), (xva, yva) = digits_split(data_cfg.get("val_fraction", 0.25), data_cfg.get("split_seed", 0))
        size = int(model_cfg["input_size"][-1])
        return ClassificationData(
            train=DigitsDataset(xtr, ytr, size, train_aug=True, seed=data_cfg.get("seed", 0)),
            train_eval_tf=DigitsDataset(xtr, ytr, size, train_aug=False),
            val=_maybe_subset(DigitsDataset(xva, yva, size, train_aug=False), data_cfg.get("val_subset")),
            name="digits",
        )
    if kind == "imagenet":
        from timm.data import ImageDataset, create_transform

        check_imagenet_root(data_cfg.get("root"))
        pp = model_cfg["preprocess"]
        common = dict(input_size=tuple(model_cfg["input_size"]), mean=tuple(pp["mean"]), std=tuple(pp["std"]), interpolation=pp["interpolation"])
        train_tf = create_transform(is_training=True, **common)
        eval_tf = create_transform(is_training=False, crop_pct=pp["crop_pct"], **common)
        root = str(data_cfg["root"])

        def folder(split, tf):
            try:
                return ImageDataset(os.path.join(root, split), transform=tf)
            except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
                raise ConfigError(f"data.root={root}: no images found under '{split}/' ({e}). Expected layout: {IMAGENET_LAYOUT}") from e

        return ClassificationData(
            train=folder("train", train_tf),
            train_eval_tf=folder("train", eval_tf),
            val=_maybe_subset(folder("val", eval_tf), data_cfg.get("val_subset")),
            name="imagenet",
        )
    raise ConfigError(f"unknown data.name={kind!r}: use one of digits, imagenet (configs/data/)")


def _maybe_subset(ds, n):
    if n is None or int(n) >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: int(n)]
    return Subset(ds, sorted(perm.tolist()))


def calibration_batches(data: ClassificationData, n: int, transform: str, batch_size: int, seed: int, device, shard: bool = False):
    """``n`` training images (fixed by ``seed``), as a list of batches on ``device``.

    transform: "train" (augmented; QwT's choice) or "eval" (RepQ-ViT's choice).
    shard: keep only this rank's share (statistics are summed across ranks afterwards)."""
    if transform not in ("train", "eval"):
        raise ConfigError(f"calibration transform must be 'train' or 'eval', got {transform!r}")
    ds = data.train if transform == "train" else data.train_eval_tf
    if n > len(ds):
        raise ConfigError(f"asked for {n} calibration samples but the training set has {len(ds)}; lower the calibration size option")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    # timm / torchvision training transforms draw from Python's and torch's global generators
    random.seed(seed)
    torch.manual_seed(seed)
    mine = set(dist.shard(list(range(len(idx))))) if shard else None
    if hasattr(ds, "gen"):
        ds.gen.manual_seed(seed)
    xs, ys = [], []
    for j, i in enumerate(idx):
        # augmentation draws advance per sample: with the train transform every rank draws for all
        # samples and keeps its share, so each image is augmented exactly as in one process
        if mine is not None and j not in mine and transform != "train":
            continue
        x, y = ds[i]
        if mine is None or j in mine:
            xs.append(x)
            ys.append(y)
    out = []
    for s in range(0, len(xs), batch_size):
        out.append((torch.stack(xs[s : s + batch_size]).to(device), torch.tensor(ys[s : s + batch_size]).to(device)))
    return out


@torch.no_grad()
def evaluate(forward, data: ClassificationData, batch_size: int, device, num_workers: int = 0, fp_preds: torch.Tensor | None = None, desc: str = "eval"):
    """Top-1 (and agreement with ``fp_preds``) over the validation set, sharded across ranks.

    Returns (metrics, preds) where preds are this rank's predictions in shard order."""
    idx = dist.shard(list(range(len(data.val))))
    loader = DataLoader(Subset(data.val, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    preds, correct = [], 0
    for x, y in tqdm(loader, desc=desc, disable=not dist.is_main(), leave=False):
        p = forward(x.to(device)).argmax(-1).cpu()
        preds.append(p)
        correct += int((p == y).sum())
    preds = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    stats = torch.tensor([correct, len(idx), 0 if fp_preds is None else int((preds == fp_preds).sum())], dtype=torch.float64)
    dist.all_reduce_sum(stats)
    metrics = {"top1": 100.0 * float(stats[0]) / max(1.0, float(stats[1]))}
    if fp_preds is not None:
        metrics["agreement"] = 100.0 * float(stats[2]) / max(1.0, float(stats[1]))
    return metrics, preds


class ClassificationTask(Task):
    """Top-1 on the validation set (and agreement with the FP model's predictions)."""

    name = "classification"
    headline = "top1"
    table_columns = (("top1", "top-1", "{:.2f}"), ("agreement", "agree", "{:.2f}"))

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        self.data = build_data(cfg["data"], cfg["model"])
        self.rt = cfg.get("runtime", {})

    @staticmethod
    def supervised_loss(logits, y):
        return F.cross_entropy(logits, y)

    def num_calibration_samples(self):
        return len(self.data.train)

    def calibration(self, n, transform, batch_size, shard=False):
        return [x for x, _ in calibration_batches(self.data, n, transform, batch_size, self.seed, self.device, shard=shard)]

    def train_batches(self, batch_size):
        g = torch.Generator().manual_seed(self.seed)
        for x, y in DataLoader(self.data.train, batch_size=batch_size, shuffle=True, generator=g,
                               num_workers=int(self.rt.get("num_workers", 0))):
            yield x.to(self.device), y.to(self.device)

    def evaluate(self, adapter, reference=None, desc="eval"):
        return evaluate(adapter.model, self.data, int(self.rt.get("eval_batch_size", 256)), self.device,
                        int(self.rt.get("num_workers", 0)), fp_preds=reference, desc=desc)
