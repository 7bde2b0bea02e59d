"""Zero-shot classification with CLIP (open_clip): top-1 / top-5 of the image embedding against
class embeddings built from prompt templates (``task=zeroshot``).

Options (``zeroshot.*``): ``mode`` = vision | vision_text (what is quantized; see
``qwt/models/open_clip.py``), ``templates`` = openai (the 80 OpenAI ImageNet templates, from
open_clip itself) | simple | a list of strings with one ``{}``. Class names: open_clip's ImageNet
class names (real data), the digit names (embedded).

Data (``data.name``):
  imagenet_cc3m   ImageNet-1k val (``data.root``: ``<root>/val/<wnid>/*.JPEG``, the 1000 folders in
                  the standard sorted order) for evaluation; CC3M image-caption pairs from WebDataset
                  shards (``data.cc3m_root``: ``cc3m-train-*.tar``, members ``<key>.jpg`` +
                  ``<key>.txt``) for calibration, drawn across the shards with a fixed seed.
                  Preprocessing: the model's own open_clip transforms (train: its random resized
                  crop; eval: resize + center crop).
  digits_wild_pairs  the embedded set: generated "digits in the wild" images (held-out glyphs for
                  evaluation) with label captions for calibration.
A calibration batch is an image tensor (mode vision) or ``{"image", "text"}`` (vision_text).
QwT* on this task is distillation only: there are no labels, so its supervised term is zero and it
trains the branches on the MSE between quantized and FP embeddings (the adapter's ``features``).
"""
from __future__ import annotations

import glob
import io
import os
import random
import tarfile

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import dist
from ..errors import ConfigError
from .base import Task

CC3M_LAYOUT = "<cc3m_root>/cc3m-train-0000.tar, cc3m-train-0001.tar, ... (WebDataset shards with <key>.jpg and <key>.txt members)"
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")


def resolve_templates(spec):
    """A list of callables class name -> prompt."""
    import open_clip

    if spec in (None, "openai"):
        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(t, str) and "{}" in t for t in spec):
        return [(lambda c, t=t: t.format(c)) for t in spec]
    raise ConfigError(f"zeroshot.templates={spec!r}: use openai (the 80 OpenAI templates), simple, or a list of strings with '{{}}'")


def check_imagenet_val(root) -> str:
    if root is None or str(root) in ("", "???"):
        raise ConfigError("data.root is not set: point it at an ImageNet folder holding val/<wnid>/*.JPEG "
                          "(python run.py +exp=clip_vision_w6a6 data.root=/path/to/imagenet data.cc3m_root=/path/to/cc3m)")
    val = os.path.join(str(root), "val")
    if not os.path.isdir(val):
        raise ConfigError(f"data.root={root}: missing folder 'val/' (expected {root}/val/<wnid>/*.JPEG, 1000 class folders)")
    dirs = sorted(e.name for e in os.scandir(val) if e.is_dir())
    if len(dirs) != 1000:
        raise ConfigError(f"data.root={root}: val/ holds {len(dirs)} class folders, zero-shot ImageNet needs the 1000 "
                          "wnid folders (labels are their sorted order, matching open_clip's IMAGENET_CLASSNAMES)")
    return val


def cc3m_shards(root) -> list[str]:
    if root is None or str(root) in ("", "???"):
        raise ConfigError(f"data.cc3m_root is not set: point it at the CC3M WebDataset shards ({CC3M_LAYOUT})")
    shards = sorted(glob.glob(os.path.join(str(root), "cc3m-train-*.tar")))
    if not shards:
        raise ConfigError(f"data.cc3m_root={root}: no cc3m-train-*.tar shards there (expected {CC3M_LAYOUT})")
    return shards


def read_cc3m_pairs(shards: list[str], n: int, seed: int, per_shard: int = 32) -> list[tuple[bytes, str]]:
    """``n`` (image bytes, caption) pairs drawn across the shards: shards in a seeded random
    order, ``per_shard`` seeded random pairs from each, until ``n``."""
    rng = random.Random(seed)
    order = list(shards)
    rng.shuffle(order)
    out = []
    for path in order:
        try:
            with tarfile.open(path) as tf:
                members = {}
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    stem, _, ext = base.partition(".")  # WebDataset: the key ends at the basename's first dot
                    key = os.path.join(d, stem)
                    members.setdefault(key, {})[ext.lower()] = m
                keys = sorted(k for k, v in members.items() if "txt" in v and any(e.lstrip(".") in v for e in IMAGE_EXT))
                rng.shuffle(keys)
                for k in keys[:per_shard]:
                    v = members[k]
                    img = next(v[e.lstrip(".")] for e in IMAGE_EXT if e.lstrip(".") in v)
                    out.append((tf.extractfile(img).read(), tf.extractfile(v["txt"]).read().decode("utf-8", "replace").strip()))
                    if len(out) >= n:
                        return out
        except tarfile.TarError as e:
            raise ConfigError(f"data.cc3m_root: {path} is not a readable tar shard ({e})") from e
    raise ConfigError(f"data.cc3m_root: only {len(out)} image-caption pairs found in {len(shards)} shards, {n} needed")


class ZeroShotTask(Task):
    name = "zeroshot"
    headline = "top1"
    table_columns = (("top1", "top-1", "{:.2f}"), ("top5", "top-5", "{:.2f}"), ("agreement", "agree", "{:.2f}"))

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        zs = cfg.get("zeroshot") or {}
        self.mode = zs.get("mode", "vision")
        if self.mode not in ("vision", "vision_text"):
            raise ConfigError(f"zeroshot.mode={self.mode!r}: use vision or vision_text")
        self.rt = cfg.get("runtime", {})
        self.data_cfg, self.model_cfg = cfg["data"], cfg["model"]
        kind = self.data_cfg["name"]
        self._pairs_cache = {}
        if kind == "imagenet_cc3m":  # fail early: both folders are checked before any model is built
            self.val_dir = check_imagenet_val(self.data_cfg.get("root"))
            self.shards = cc3m_shards(self.data_cfg.get("cc3m_root"))
            from ..models.open_clip import check_clip_weights

            check_clip_weights(self.model_cfg)
        elif kind == "digits_wild_pairs":
            if self.model_cfg.get("source") != "open_clip_embedded":
                raise ConfigError("data=digits_wild_pairs goes with the embedded CLIP (model=clip_embedded)")
        else:
            raise ConfigError(f"data.name={kind!r} is not a zero-shot dataset: use imagenet_cc3m or digits_wild_pairs")
        self.templates = resolve_templates(zs.get("templates", "openai"))
        self.clip = self.tokenizer = self.preprocess = None

    # -- model ------------------------------------------------------------------------------
    def _load_clip(self):
        from ..models.open_clip import load_clip

        if self.clip is None:
            self.clip, self.tokenizer, self.preprocess = load_clip(self.model_cfg, self.log)
        return self.clip

    def class_names(self) -> list[str]:
        if self.data_cfg["name"] == "imagenet_cc3m":
            import open_clip

            return list(open_clip.IMAGENET_CLASSNAMES)
        from ..models.clip_embedded import WORDS

        return list(WORDS)

    def build_model(self):
        from ..models.open_clip import ZeroShotCLIP

        clip = self._load_clip()
        names = self.class_names()
        prompts = [t(c) for c in names for t in self.templates]
        tokens = self.tokenizer(prompts).reshape(len(names), len(self.templates), -1)
        with torch.no_grad():
            # built on the FP text tower: in mode vision this classifier is what gets quantized
            model = ZeroShotCLIP(clip, tokens, self.mode, self.model_cfg.get("patch_input_bits", 8))
        return model.eval()

    # -- data -------------------------------------------------------------------------------
    def num_calibration_samples(self):
        if self.data_cfg["name"] == "digits_wild_pairs":
            return int(self.data_cfg["calib_pool"])
        return None

    def _pairs(self, n: int, transform: str):
        """(images (n, 3, H, W) float, captions list[str]) of the first ``n`` calibration pairs."""
        key = (n, transform)
        if key in self._pairs_cache:
            return self._pairs_cache[key]
        if self.data_cfg["name"] == "digits_wild_pairs":
            from ..data.digits_wild import WildSpec, load as load_images
            from ..models.clip_embedded import caption, images_to_input

            d = self.data_cfg
            pool = int(d["calib_pool"])
            if n > pool:
                raise ConfigError(f"asked for {n} calibration pairs but data.calib_pool={pool}")
            imgs, labels = load_images("train", pool, WildSpec(size=int(d["image_size"])), seed=int(d["calib_seed"]))
            rng = random.Random(self.seed)
            idx = torch.randperm(pool, generator=torch.Generator().manual_seed(self.seed))[:n]
            x = images_to_input(imgs[idx])
            caps = [caption(int(labels[i]), rng) for i in idx]
        else:
            from PIL import Image

            raw = read_cc3m_pairs(self.shards, n, self.seed, int(self.data_cfg.get("per_shard", 32)))
            self._load_clip()
            tf = self.preprocess[0] if transform == "train" else self.preprocess[1]
            random.seed(self.seed)
            torch.manual_seed(self.seed)
            x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in raw])
            caps = [c for _, c in raw]
        self._pairs_cache = {key: (x, caps)}
        return x, caps

    def calibration(self, n, transform, batch_size, shard=False):
        if transform not in ("train", "eval"):
            raise ConfigError(f"calibration transform must be 'train' or 'eval', got {transform!r}")
        self._load_clip()
        x, caps = self._pairs(n, transform)
        idx = list(range(n))
        if shard:
            idx = dist.shard(idx)
        out = []
        for s in range(0, len(idx), batch_size):
            part = idx[s : s + batch_size]
            imgs = x[part].to(self.device)
            if self.mode == "vision":
                out.append(imgs)
            else:
                out.append({"image": imgs, "text": self.tokenizer([caps[i] for i in part]).to(self.device)})
        return out

    def train_batches(self, batch_size):
        """One epoch over the calibration pool (QwT*): (batch, None); no labels (distillation only)."""
        n = int(self.data_cfg.get("train_pairs") or self.data_cfg.get("calib_pool") or 512)
        for b in self.calibration(n, "train", batch_size):
            yield b, None

    @staticmethod
    def supervised_loss(out, target):
        if target is not None:
            raise ConfigError("zero-shot training batches carry no labels")
        return out.sum() * 0.0  # QwT* here: the feature MSE alone

    # -- evaluation -------------------------------------------------------------------------
    def _val(self):
        if self.data_cfg["name"] == "digits_wild_pairs":
            from ..data.digits_wild import WildSpec, load as load_images
            from ..models.clip_embedded import images_to_input

            d = self.data_cfg
            imgs, labels = load_images("eval", int(d["eval_images"]), WildSpec(size=int(d["image_size"])), seed=0)
            return torch.utils.data.TensorDataset(images_to_input(imgs), labels)
        from torchvision.datasets import ImageFolder

        self._load_clip()
        ds = ImageFolder(self.val_dir, transform=self.preprocess[1])
        n = self.data_cfg.get("val_subset")
        if n is not None and int(n) < len(ds):
            perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: int(n)]
            ds = torch.utils.data.Subset(ds, sorted(perm.tolist()))
        return ds

    @torch.no_grad()
    def evaluate(self, adapter, reference=None, desc="eval"):
        model = adapter.model
        if model.mode == "vision_text":
            model.refresh_classifier()  # from the text tower as it is now (quantized + compensated)
        ds = self._val()
        idx = dist.shard(list(range(len(ds))))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=int(self.rt.get("eval_batch_size", 256)),
                                             shuffle=False, num_workers=int(self.rt.get("num_workers", 0)))
        preds, c1, c5 = [], 0, 0
        for x, y in tqdm(loader, desc=desc, disable=not dist.is_main(), leave=False):
            logits = model(x.to(self.device)).cpu()
            top5 = logits.topk(min(5, logits.shape[-1]), -1).indices
            preds.append(top5[:, 0])
            c1 += int((top5[:, 0] == y).sum())
            c5 += int((top5 == y[:, None]).any(-1).sum())
        preds = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        stats = torch.tensor([c1, c5, len(idx), 0 if reference is None else int((preds == reference).sum())], dtype=torch.float64)
        dist.all_reduce_sum(stats)
        n = max(1.0, float(stats[2]))
        metrics = {"top1": 100.0 * float(stats[0]) / n, "top5": 100.0 * float(stats[1]) / n}
        if reference is not None:
            metrics["agreement"] = 100.0 * float(stats[3]) / n
        metrics["mode"] = model.mode
        return metrics, preds

    def format_table(self, rows, fp_metrics):
        return f"zero-shot mode {self.mode}\n" + super().format_table(rows, fp_metrics)
