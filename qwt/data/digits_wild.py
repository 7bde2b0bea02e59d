""""Digits in the wild": the embedded image benchmark, generated deterministically from the glyphs
scikit-learn ships (1797 handwritten 8x8 digits).

Each image: one glyph, upsampled to ``glyph_px`` pixels (random in a range), rotated (random
angle), with a random stroke contrast and polarity, placed at a random position on a
``size`` x ``size`` canvas whose background is a random linear gradient plus low-frequency and
pixel noise. Train and eval images come from disjoint glyph sets (sklearn's digits split 75/25 with
a fixed seed, as the 8x8 benchmark did), so evaluation measures generalisation to new handwriting.

Generation is float64 and the result is stored as uint8, so every machine gets the same bytes
(an ulp of difference never crosses a uint8 rounding boundary in practice); it is cached under
``cache_dir`` keyed by every generation parameter, and takes a few seconds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class WildSpec:
    size: int = 32                  # canvas side (pixels)
    glyph_px: tuple = (18, 26)      # glyph side, uniform in [lo, hi]
    max_rotation: float = 12.0      # degrees, uniform in [-r, r]
    contrast: tuple = (0.35, 1.0)   # |stroke - background|, uniform (on a 0..1 intensity scale)
    noise: float = 0.08             # pixel noise std
    blob_noise: float = 0.10        # low-frequency background noise std
    invert_prob: float = 0.3        # dark strokes on a light background
    channels: int = 1
    version: int = 1                # bump when the generator changes


def glyph_split(val_fraction: float = 0.25, seed: int = 0):
    """(train glyphs, eval glyphs): ((x, y), (x, y)) with x (N, 8, 8) in [0, 1] float64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float64) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def _render(glyphs: torch.Tensor, spec: WildSpec, g: torch.Generator) -> torch.Tensor:
    """glyphs (N, 8, 8) in [0, 1] -> images (N, C, S, S) in [0, 1], float64."""
    n, S = glyphs.shape[0], spec.size
    u = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    px = spec.glyph_px[0] + u(n) * (spec.glyph_px[1] - spec.glyph_px[0])
    ang = (u(n) * 2 - 1) * math.radians(spec.max_rotation)
    # placement: the glyph's centre anywhere that keeps most of it on the canvas
    half = px / 2
    cx = half + u(n) * (S - 2 * half).clamp_min(0)
    cy = half + u(n) * (S - 2 * half).clamp_min(0)
    # inverse affine map: output pixel (normalised to [-1, 1]) -> glyph coordinates (normalised)
    scale = S / px
    cos, sin = torch.cos(ang), torch.sin(ang)
    tx, ty = (2 * cx / S - 1), (2 * cy / S - 1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * scale, sin * scale
    theta[:, 1, 0], theta[:, 1, 1] = -sin * scale, cos * scale
    theta[:, 0, 2] = -(theta[:, 0, 0] * tx + theta[:, 0, 1] * ty)
    theta[:, 1, 2] = -(theta[:, 1, 0] * tx + theta[:, 1, 1] * ty)
    grid = F.affine_grid(theta, (n, 1, S, S), align_corners=False)
    stroke = F.grid_sample(glyphs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # background: a linear gradient in a random direction plus smooth blobs
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, S, dtype=torch.float64), torch.linspace(-1, 1, S, dtype=torch.float64), indexing="ij")
    gdir = u(n) * 2 * math.pi
    base = 0.2 + 0.6 * u(n)
    slope = 0.25 * u(n)
    bg = base[:, None, None] + slope[:, None, None] * (torch.cos(gdir)[:, None, None] * xx + torch.sin(gdir)[:, None, None] * yy)
    blobs = F.interpolate(torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), size=(S, S), mode="bicubic", align_corners=False)
    bg = bg[:, None] + spec.blob_noise * blobs
    contrast = spec.contrast[0] + u(n) * (spec.contrast[1] - spec.contrast[0])
    sign = torch.where(u(n) < spec.invert_prob, -1.0, 1.0).to(torch.float64)
    # strokes lighter than the background (or darker, when inverted), clipped into [0, 1]
    img = bg + (sign * contrast)[:, None, None, None] * stroke
    img = img + spec.noise * torch.randn(img.shape, generator=g, dtype=torch.float64)
    if spec.channels > 1:
        img = img.repeat(1, spec.channels, 1, 1)
    return img.clamp(0, 1)


def generate(split: str, n: int, spec: WildSpec = WildSpec(), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``split`` ("train" or "eval"): (uint8 images (n, C, S, S), labels (n,))."""
    (xtr, ytr), (xva, yva) = glyph_split()
    xs, ys = (xtr, ytr) if split == "train" else (xva, yva)
    g = torch.Generator().manual_seed(1000 * seed + (0 if split == "train" else 1))
    idx = torch.randint(0, len(ys), (n,), generator=g)
    imgs, chunk = [], 4096
    for s in range(0, n, chunk):
        part = idx[s:s + chunk]
        imgs.append(torch.round(_render(xs[part], spec, g) * 255).to(torch.uint8))
    return torch.cat(imgs), ys[idx]


def cache_path(split: str, n: int, spec: WildSpec, seed: int, cache_dir: str | None) -> Path:
    key = json.dumps({"split": split, "n": n, "seed": seed, **asdict(spec)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(os.path.expanduser(cache_dir or os.environ.get("QWT_CACHE", "~/.cache/qwt")))
    return root / "data" / f"digits_wild-{split}-{n}-{digest}.pt"


def load(split: str, n: int, spec: WildSpec = WildSpec(), seed: int = 0, cache_dir: str | None = None):
    """Cached ``generate``: (uint8 images, labels)."""
    path = cache_path(split, n, spec, seed, cache_dir)
    if path.is_file():
        d = torch.load(path, map_location="cpu", weights_only=True)
        return d["images"], d["labels"]
    images, labels = generate(split, n, spec, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": images, "labels": labels}, tmp)
    os.replace(tmp, path)
    return images, labels


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0
