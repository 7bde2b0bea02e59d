"""Embedded instance-segmentation benchmark: coloured shapes on textured backgrounds, in COCO format.

Each image (``size`` x ``size``, RGB) holds 1-``max_objects`` objects of four classes (circle,
square, triangle, star) with random size, position, rotation and colour, drawn in order so that
later objects occlude earlier ones. An object's mask is its *visible* part; objects that are less
than ``min_visible`` visible are dropped. Annotations are COCO polygons (from the visible mask's
contours), so mmdet's loaders and ``CocoMetric`` read it like COCO 2017:

    <root>/annotations/instances_{train,val}2017.json, <root>/train2017/*.png, <root>/val2017/*.png

Generation is deterministic (numpy seed per image) and cached under a key of its settings.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle", "star")
VERSION = 1


def _shape_mask(cls: str, size: int, cx: float, cy: float, r: float, angle: float):
    import cv2

    m = np.zeros((size, size), np.uint8)
    if cls == "circle":
        cv2.circle(m, (int(round(cx)), int(round(cy))), int(round(r)), 1, -1, lineType=cv2.LINE_8)
        return m
    if cls == "square":
        k, ang = 4, [angle + math.pi / 4 + i * math.pi / 2 for i in range(4)]
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in ang]
    elif cls == "triangle":
        pts = [(cx + r * math.cos(angle + i * 2 * math.pi / 3), cy + r * math.sin(angle + i * 2 * math.pi / 3)) for i in range(3)]
    elif cls == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else 0.45 * r
            a = angle + i * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    else:
        raise ValueError(cls)
    cv2.fillPoly(m, [np.round(np.array(pts)).astype(np.int32)], 1)
    return m


def _background(rng, size: int):
    base = rng.uniform(40, 200, size=3)
    gx, gy = rng.uniform(-60, 60, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = base[None, None] + xx[..., None] * gx[None, None] + yy[..., None] * gy[None, None]
    img = img + rng.normal(0, 12, size=(size, size, 3))
    return img


def make_image(seed: int, size: int = 128, max_objects: int = 5, min_visible: float = 0.35):
    """(uint8 image HxWx3 RGB, [(class index, visible mask), ...])."""
    rng = np.random.default_rng(seed)
    img = _background(rng, size)
    n = int(rng.integers(1, max_objects + 1))
    objs = []
    for _ in range(n):
        c = int(rng.integers(len(CLASSES)))
        r = float(rng.uniform(7, 24))
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
        m = _shape_mask(CLASSES[c], size, cx, cy, r, float(rng.uniform(0, 2 * math.pi))).astype(bool)
        if m.sum() < 20:
            continue
        colour = rng.uniform(0, 255, size=3)
        shade = 1.0 + 0.15 * (np.mgrid[0:size, 0:size][0] - cy) / max(r, 1)  # a little shading
        img[m] = np.clip(colour[None] * shade[m][:, None], 0, 255)
        for o in objs:
            o[1] &= ~m
        objs.append([c, m, int(m.sum())])
    img = np.clip(img, 0, 255).astype(np.uint8)
    kept = [(c, m) for c, m, full in objs if m.sum() >= min_visible * full and m.sum() >= 12]
    return img, kept


def _polygons(mask: np.ndarray) -> list:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        if len(c) >= 3:
            out.append([float(v) + 0.5 * 0 for v in c.reshape(-1).tolist()])
    return out


def build_split(root: Path, split: str, n: int, seed0: int, size: int) -> None:
    import cv2
    from pycocotools import mask as mask_util

    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    aid = 1
    for i in range(n):
        img, objs = make_image(seed0 + i, size)
        name = f"{i:06d}.png"
        cv2.imwrite(str(img_dir / name), img[..., ::-1])  # RGB -> BGR for OpenCV
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for c, m in objs:
            polys = _polygons(m)
            if not polys:
                continue
            rle = mask_util.frPyObjects(polys, size, size)
            area = float(mask_util.area(mask_util.merge(rle)))
            x, y, w, h = mask_util.toBbox(mask_util.merge(rle)).tolist()
            if area < 8 or w < 2 or h < 2:
                continue
            anns.append({"id": aid, "image_id": i + 1, "category_id": c + 1, "segmentation": polys, "area": area,
                         "bbox": [x, y, w, h], "iscrowd": 0})
            aid += 1
    cats = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    tmp = root / "annotations" / f".instances_{split}2017.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    os.replace(tmp, root / "annotations" / f"instances_{split}2017.json")


def ensure_dataset(cache_dir: str | os.PathLike, n_train: int = 2000, n_val: int = 300, size: int = 128, seed: int = 0) -> Path:
    """The dataset's root (generated once; a finished marker guards partial writes)."""
    key = json.dumps({"v": VERSION, "n_train": n_train, "n_val": n_val, "size": size, "seed": seed}, sort_keys=True)
    root = Path(os.path.expanduser(str(cache_dir))) / f"det_shapes-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    done = root / ".complete"
    if done.is_file():
        return root
    build_split(root, "train", n_train, seed * 1_000_003 + 10_000_000, size)
    build_split(root, "val", n_val, seed * 1_000_003, size)
    done.write_text(key)
    return root
