"""The embedded CLIP: a small ``open_clip.CLIP`` (open_clip's own classes: VisionTransformer image
tower, TextTransformer text tower, QuickGELU) with open_clip's BPE tokenizer, trained here
contrastively on "digits in the wild" images (``qwt/data/digits_wild.py``) paired with captions
generated from their labels in varied wording.

Tokenizer: open_clip's ``SimpleTokenizer`` (BPE, start/end tokens, zero padding, argmax pooling
on the end token), followed by a fixed map from the BPE ids that occur in the caption and prompt
vocabulary to a compact id range (so the token embedding has ~60 rows, not 49,408). The map is
order-preserving, so the end token stays the largest id and open_clip's argmax pooling still
finds it; it is stored with the weights (``vocab_ids``).

Training (``python tools/train_embedded.py clip_embedded``): AdamW, cosine schedule, the text
tower at a tenth of the image tower's learning rate (else both collapse before the image tower
has learnt anything), the symmetric contrastive loss of CLIP with a learnable temperature; captions of the same digit in
one batch are all positives (a batch of 10 classes has many duplicates, which the one-hot CLIP
target would treat as negatives), i.e. the target of each row is uniform over same-label columns.
"""
from __future__ import annotations

import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# training captions ({w}: the digit's name, {d}: the numeral)
CAPTION_TEMPLATES = (
    "a photo of the number {w}", "the digit {d}", "{w}", "a handwritten {w}", "an image of a {d}",
    "the number {w} written by hand", "a picture showing the digit {w}", "{d}", "a blurry photo of a {w}",
    "a {w} on a noisy background", "digit {d}", "this is a {w}", "a photo of the digit {d}",
    "a drawing of the number {w}", "a dark photo of a {w}", "a bright picture of the numeral {d}",
)

# zero-shot prompts of the evaluation (class names are the words); some wordings are unseen in training
EVAL_TEMPLATES = (
    "a photo of the digit {}.", "a handwritten {}.", "the number {}.", "a picture of a {}.",
    "a blurry photo of the number {}.", "a drawing of a {}.",
)


def caption(label: int, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(w=WORDS[label], d=label)


def vocabulary_texts(eval_templates=EVAL_TEMPLATES) -> list[str]:
    texts = [t.format(w=w, d=i) for t in CAPTION_TEMPLATES for i, w in enumerate(WORDS)]
    texts += [t.format(w) for t in eval_templates for w in WORDS]
    return texts


class CompactTokenizer:
    """open_clip's BPE tokenizer + an order-preserving map onto the ids in ``vocab_ids``."""

    def __init__(self, vocab_ids: torch.Tensor, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self.bpe = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_ids = vocab_ids.long()
        self.lut = torch.full((len(self.bpe.encoder),), -1, dtype=torch.long)
        self.lut[self.vocab_ids] = torch.arange(len(self.vocab_ids))

    @classmethod
    def build(cls, texts, context_length: int) -> "CompactTokenizer":
        from open_clip.tokenizer import SimpleTokenizer

        ids = SimpleTokenizer(context_length=context_length)(list(texts), context_length=context_length)
        used = torch.unique(torch.cat([ids.flatten(), torch.tensor([0])]))  # 0: padding stays 0
        return cls(used, context_length)

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.bpe(texts, context_length=self.context_length)
        out = self.lut[ids]
        if (out < 0).any():
            bad = [t for t, row in zip(texts, out) if (row < 0).any()]
            raise ConfigError(f"the embedded CLIP's vocabulary has no token for a word of {bad[:3]}: use prompt "
                              "templates made of the words in qwt/models/clip_embedded.py (CAPTION_TEMPLATES / EVAL_TEMPLATES)")
        return out


def build_arch(model_cfg: dict, vocab_size: int) -> nn.Module:
    from open_clip.model import CLIP

    a = model_cfg["arch"]
    text_cfg = dict(a["text_cfg"], vocab_size=vocab_size, context_length=int(model_cfg["context_length"]))
    return CLIP(embed_dim=int(a["embed_dim"]), vision_cfg=dict(a["vision_cfg"]), text_cfg=text_cfg,
                quick_gelu=bool(a.get("quick_gelu", True)))


def load(model_cfg: dict, log=print):
    """(float CLIP, tokenizer) from the shipped weights."""
    from .shipped import load_shipped

    state, _ = load_shipped(model_cfg["name"])
    vocab = state.pop("vocab_ids").long()
    clip = build_arch(model_cfg, len(vocab))
    clip.load_state_dict(state, strict=True)
    return clip.eval(), CompactTokenizer(vocab, int(model_cfg["context_length"]))


def images_to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, S, S) -> float (N, 3, S, S) in [-1, 1] (open_clip's patch conv takes 3 channels)."""
    from ..data.digits_wild import to_float

    x = to_float(images_u8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def train(model_cfg: dict, log=print):
    """The ``train.entry`` of configs/model/clip_embedded.yaml: (state dict, training log)."""
    from ..data.digits_wild import WildSpec, load as load_images

    tc = model_cfg["train"]
    seed = int(tc["seed"])
    torch.manual_seed(seed)
    ctx = int(model_cfg["context_length"])
    tok = CompactTokenizer.build(vocabulary_texts(), ctx)
    clip = build_arch(model_cfg, len(tok.vocab_ids))
    spec = WildSpec(size=int(model_cfg["arch"]["vision_cfg"]["image_size"]))
    imgs, labels = load_images("train", int(tc["images"]), spec, seed=int(tc.get("data_seed", 0)))
    x_all = images_to_input(imgs)
    rng = random.Random(seed)
    bs, epochs, lr = int(tc["batch_size"]), int(tc["epochs"]), float(tc["lr"])
    steps_per_epoch = len(labels) // bs
    total = epochs * steps_per_epoch
    # the text tower learns 10x slower (``text_lr_scale``): at the start the image features carry no
    # label information, and a text tower as fast as the image tower collapses every caption onto
    # one embedding (loss = log(batch), no gradient left to separate the classes)
    vis = {id(p) for p in clip.visual.parameters()}
    groups = {}
    for n, p in clip.named_parameters():
        tower = "vis" if id(p) in vis or n == "logit_scale" else "txt"
        wd = 0.0 if p.ndim < 2 or "embedding" in n or "logit_scale" in n else float(tc["weight_decay"])
        groups.setdefault((tower, wd), []).append(p)
    scale = {"vis": 1.0, "txt": float(tc.get("text_lr_scale", 0.1))}
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": wd, "lr": lr * scale[t]} for (t, wd), ps in groups.items()], lr=lr)
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    g = torch.Generator().manual_seed(seed)
    clip.train()
    t0, losses = time.time(), []
    for ep in range(epochs):
        perm = torch.randperm(len(labels), generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * bs : (s + 1) * bs]
            x = x_all[idx]
            # augmentation: random shift by up to 2 pixels (the canvas is noisy background around the glyph)
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            y = labels[idx]
            ids = tok([caption(int(l), rng) for l in y])
            img = F.normalize(clip.encode_image(x), dim=-1)
            txt = F.normalize(clip.encode_text(ids), dim=-1)
            logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T
            same = (y[:, None] == y[None, :]).float()
            target = same / same.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                          + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        log(f"[clip_embedded] epoch {ep + 1}/{epochs} loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.4f} "
            f"({time.time() - t0:.0f}s)")
    clip.eval()
    acc = zero_shot_accuracy(clip, tok, spec, int(tc.get("check_images", 1000)))
    log(f"[clip_embedded] zero-shot top-1 on {int(tc.get('check_images', 1000))} held-out images: {acc:.2f}")
    state = dict(clip.state_dict())
    state["vocab_ids"] = tok.vocab_ids.clone()
    return state, {"final_loss": round(sum(losses[-steps_per_epoch:]) / steps_per_epoch, 4), "steps": len(losses),
                   "zero_shot_top1_check": round(acc, 2), "vocab_size": len(tok.vocab_ids)}


@torch.no_grad()
def zero_shot_accuracy(clip, tok, spec, n: int) -> float:
    from ..data.digits_wild import load as load_images

    imgs, labels = load_images("eval", n, spec, seed=0)
    cls = []
    for w in WORDS:
        e = F.normalize(clip.encode_text(tok([t.format(w) for t in EVAL_TEMPLATES])), dim=-1)
        cls.append(F.normalize(e.mean(0), dim=-1))
    cls = torch.stack(cls)
    pred = (F.normalize(clip.encode_image(images_to_input(imgs)), dim=-1) @ cls.T).argmax(-1)
    return 100.0 * float((pred == labels).float().mean())
