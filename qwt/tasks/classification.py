"""Image classification: data (the embedded "digits in the wild" or an ImageNet folder) and the
evaluator (top-1, agreement with FP, and the logit distances to FP).

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
# the embedded benchmark: "digits in the wild" (qwt/data/digits_wild.py), generated and cached


class GeneratedImages(Dataset):
    """uint8 images (N, C, S, S) and labels -> (float image in [-1, 1], label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1.0, int(self.labels[i])


def embedded_data_cfg(**over) -> dict:
    """configs/data/digits_wild.yaml as the runner sees it (cache dir resolved as Hydra does), for
    tools and tests that build the embedded data outside Hydra."""
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "data" / "digits_wild.yaml").read_text())
    cfg["cache_dir"] = os.environ.get("QWT_CACHE", "~/.cache/qwt")
    cfg.update(over)
    return cfg


def wild_spec(data_cfg: dict):
    from ..data.digits_wild import WildSpec

    spec = dict(data_cfg.get("spec") or {})
    for k in ("glyph_px", "contrast"):
        if k in spec:
            spec[k] = tuple(spec[k])
    try:
        return WildSpec(**spec)
    except TypeError as e:
        raise ConfigError(f"data.spec: {e}; the generator's options are the fields of qwt.data.digits_wild.WildSpec") from e


def digits_wild_split(data_cfg: dict, split: str):
    """(images uint8, labels) of ``split`` (train / eval), generated once and cached."""
    from ..data.digits_wild import load

    n = int(data_cfg["n_train" if split == "train" else "n_eval"])
    return load(split, n, wild_spec(data_cfg), int(data_cfg.get("gen_seed", 0)), data_cfg.get("cache_dir"))


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
    if kind == "digits_wild":
        train = GeneratedImages(*digits_wild_split(data_cfg, "train"))
        val = GeneratedImages(*digits_wild_split(data_cfg, "eval"))
        if tuple(train.images.shape[1:]) != tuple(model_cfg["input_size"]):
            raise ConfigError(f"data=digits_wild makes {tuple(train.images.shape[1:])} images but model.input_size="
                              f"{list(model_cfg['input_size'])}: use a model trained on this benchmark (model=embedded_vit, "
                              "embedded_resnet) or set data.spec.size / data.spec.channels to match")
        # generated images carry their augmentation (placement, rotation, background): the "train"
        # and "eval" calibration transforms are the same images
        return ClassificationData(train=train, train_eval_tf=train, val=_maybe_subset(val, data_cfg.get("val_subset")),
                                  name="digits_wild")
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
    raise ConfigError(f"unknown data.name={kind!r}: use one of digits_wild, imagenet (configs/data/)")


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
def evaluate(forward, data: ClassificationData, batch_size: int, device, num_workers: int = 0, fp_logits: torch.Tensor | None = None, desc: str = "eval"):
    """Top-1 over the validation set, sharded across ranks; with ``fp_logits`` (the FP model's
    logits of this rank's shard) also the agreement with the FP predictions and two distances of
    the logits to FP's, which resolve differences far below one image of top-1:
      logit_mse  mean over images and classes of (z_q - z_fp)^2
      logit_kl   mean over images of KL(softmax z_fp || softmax z_q)  (nats)

    Returns (metrics, logits) where logits are this rank's (float32, on the CPU) in shard order."""
    idx = dist.shard(list(range(len(data.val))))
    loader = DataLoader(Subset(data.val, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logits, correct = [], 0
    for x, y in tqdm(loader, desc=desc, disable=not dist.is_main(), leave=False):
        z = forward(x.to(device)).float().cpu()
        logits.append(z)
        correct += int((z.argmax(-1) == y).sum())
    logits = torch.cat(logits) if logits else torch.zeros(0, 0)
    # sums: correct, count, agree, squared logit error, KL, logit entries
    stats = torch.tensor([correct, len(idx), 0, 0, 0, logits.numel()], dtype=torch.float64)
    if fp_logits is not None:
        d = logits.double() - fp_logits.double()
        logp_fp, logp_q = F.log_softmax(fp_logits.double(), -1), F.log_softmax(logits.double(), -1)
        stats[2] = float((logits.argmax(-1) == fp_logits.argmax(-1)).sum())
        stats[3] = float(d.pow(2).sum())
        stats[4] = float((logp_fp.exp() * (logp_fp - logp_q)).sum())
    dist.all_reduce_sum(stats)
    n = max(1.0, float(stats[1]))
    metrics = {"top1": 100.0 * float(stats[0]) / n}
    if fp_logits is not None:
        metrics["agreement"] = 100.0 * float(stats[2]) / n
        metrics["logit_mse"] = float(stats[3]) / max(1.0, float(stats[5]))
        metrics["logit_kl"] = float(stats[4]) / n
    return metrics, logits


class ClassificationTask(Task):
    """Top-1 on the validation set; against the FP model: agreement, logit MSE and KL(FP || Q)."""

    name = "classification"
    headline = "top1"
    table_columns = (("top1", "top-1", "{:.2f}"), ("agreement", "agree", "{:.2f}"),
                     ("logit_mse", "logit MSE", "{:.4f}"), ("logit_kl", "KL(FP||Q)", "{:.4f}"))

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
                        int(self.rt.get("num_workers", 0)), fp_logits=reference, desc=desc)
