"""open_clip models (``open_clip.CLIP`` / ``CustomTextCLIP`` with open_clip's own transformer towers)
for zero-shot classification, quantized as the official QwT multimodal code does.

Attention: open_clip's ``ResidualAttentionBlock`` uses ``nn.MultiheadAttention``, whose forward
reads its packed ``in_proj_weight`` (and ``out_proj.weight``) directly: wrapping its Linears would
quantize nothing. ``rebuild_attention`` replaces every one with ``ExplicitAttention``: a fused
``qkv`` Linear (the packed q/k/v projection, one input quantizer as in the reference) and an
``out_proj`` Linear, with the attention itself computed by ``F.scaled_dot_product_attention`` (the
kernel ``nn.MultiheadAttention`` itself calls; the attention matmuls and softmax stay float).
The open_clip block keeps its own forward (``block(x, attn_mask=...)``), so the rebuilt model is
the same function as open_clip's (tests/test_clip.py). Any ``nn.MultiheadAttention`` left in a
tower that would be quantized is an error (``OpenCLIPAdapter.quant_roles``).

``ZeroShotCLIP`` (an ``AdaptedModel``) = the CLIP model + a zero-shot classifier Linear
(embed_dim -> classes, no bias) whose rows are the normalised class embeddings (templates averaged,
renormalised), applied to the normalised image embedding. ``mode`` says what is quantized:

  vision       the visual tower (patch conv + every Linear of its blocks) and the classifier; the
               classifier is built from the FP text tower before quantization (at model build);
               QwT's units are the visual blocks.
  vision_text  both towers; the classifier is not quantized and is rebuilt from the (quantized,
               compensated) text tower whenever the model is evaluated (``refresh_classifier``);
               QwT's units are the visual blocks, then the text blocks.

A calibration batch is an image tensor (vision) or a dict ``{"image": images, "text": token ids}``
(vision_text: image-caption pairs). In vision_text mode the unit chain carries the image tokens
past the visual blocks in ``State.extras`` and the first text unit embeds the caption tokens
(``unit_input``), so one walk calibrates both towers and every text position (padding included)
is a QwT regression row, as in the reference. The patch conv's input quantizer is 8-bit whatever
the run's bits (the reference hard-codes it; ``model.patch_input_bits``), its weights at run bits;
the classifier (vision mode) at run bits (weights per class row, input per tensor).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import AdaptedModel, ModelAdapter, State, Unit


class ExplicitAttention(nn.Module):
    """Self-attention with quantizable projections, a drop-in for open_clip's use of
    ``nn.MultiheadAttention`` (``attn(q_x, k_x, v_x, need_weights=False, attn_mask=m)[0]``)."""

    def __init__(self, dim: int, num_heads: int, batch_first: bool = True, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim, self.batch_first = num_heads, dim // num_heads, batch_first
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "ExplicitAttention":
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError("an nn.MultiheadAttention with separate k/v dims, bias_k/bias_v or add_zero_attn "
                              "cannot be rebuilt (not used by open_clip's CLIP towers)")
        new = cls(mha.embed_dim, mha.num_heads, mha.batch_first, bias=mha.in_proj_bias is not None)
        new.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.qkv.weight.copy_(mha.in_proj_weight)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.qkv.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, **_):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("ExplicitAttention is self-attention only (open_clip's CLIP towers)")
        x = query if self.batch_first else query.transpose(0, 1)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True = not allowed (nn.MultiheadAttention's convention)
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:  # (B * heads, N, N)
                attn_mask = attn_mask.reshape(B, self.num_heads, N, N)
            attn_mask = attn_mask.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.out_proj(o.transpose(1, 2).reshape(B, N, C))
        return (o if self.batch_first else o.transpose(0, 1)), None


def rebuild_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` that is the ``attn`` of an open_clip
    ``ResidualAttentionBlock`` by ``ExplicitAttention`` (in place); returns how many."""
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    n = 0
    for name, m in model.named_modules():
        if isinstance(m, CustomResidualAttentionBlock):
            raise ConfigError(f"open_clip block '{name}' is a CustomResidualAttentionBlock (block_type=custom: qk_norm, "
                              "scaled cosine attention, ...): its attention is not supported by qwt's CLIP adapter")
        if isinstance(m, ResidualAttentionBlock) and isinstance(m.attn, nn.MultiheadAttention):
            if hasattr(m, "ln_1_kv"):
                raise ConfigError(f"open_clip block '{name}' is a cross-attention block: not supported")
            m.attn = ExplicitAttention.from_mha(m.attn)
            n += 1
    return n


def multihead_attention_left(module: nn.Module, prefix: str = "") -> list[str]:
    return [f"{prefix}{n}" for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]


# ---------------------------------------------------------------------------------------------


class _Text:
    """The text tower's parts, wherever the CLIP class keeps them (``CLIP``: on the model itself;
    ``CustomTextCLIP``: a ``TextTransformer`` at ``.text``). ``prefix``: its module path."""

    def __init__(self, clip: nn.Module, root: str = "clip"):
        from open_clip.transformer import TextTransformer

        if isinstance(getattr(clip, "text", None), TextTransformer):
            t, self.prefix = clip.text, f"{root}.text"
            self.pool_type, self.eos_id = t.pool_type, getattr(t, "eos_id", None)
            if t.cls_emb is not None or t.use_pad_mask:
                raise ConfigError("open_clip text towers with a class token or a padding mask (CoCa-style) are not supported")
        elif hasattr(clip, "token_embedding") and hasattr(clip, "transformer"):
            t, self.prefix = clip, root
            self.pool_type, self.eos_id = clip.text_pool_type, getattr(clip, "text_eos_id", None)
        else:
            raise ConfigError(f"{type(clip).__name__}: an open_clip model without an open_clip text transformer "
                              "(e.g. an HF text tower) is not supported")
        self.t = t

    @property
    def transformer(self):
        return self.t.transformer

    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        t = self.t
        x = t.token_embedding(ids)
        x = x + t.positional_embedding[: ids.shape[1]].to(x.dtype)
        mask = t.attn_mask
        if mask is not None:
            mask = mask[: ids.shape[1], : ids.shape[1]].to(x.dtype)
        if not self.transformer.batch_first:
            x = x.transpose(0, 1)
        return x, {"attn_mask": mask}

    def head(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        t = self.t
        if not self.transformer.batch_first:
            h = h.transpose(0, 1)
        x = text_global_pool(t.ln_final(h), ids, self.pool_type, eos_token_id=self.eos_id)
        proj = t.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class ZeroShotCLIP(AdaptedModel):
    """CLIP + zero-shot classifier (see the module docstring). ``class_tokens``: (classes,
    templates, context) token ids of every prompt, kept to rebuild the classifier."""

    adapter_class = "qwt.models.open_clip:OpenCLIPAdapter"
    MODES = ("vision", "vision_text")

    def __init__(self, clip: nn.Module, class_tokens: torch.Tensor, mode: str = "vision", patch_input_bits: int | None = 8,
                 quantize_classifier: bool = True):
        super().__init__()
        if mode not in self.MODES:
            raise ConfigError(f"zero-shot mode={mode!r}: use vision (visual tower + classifier quantized) or "
                              "vision_text (both towers quantized, classifier from the quantized text tower)")
        from open_clip.transformer import VisionTransformer

        if not isinstance(getattr(clip, "visual", None), VisionTransformer):
            raise ConfigError(f"{type(clip).__name__}: only open_clip VisionTransformer image towers are supported "
                              "(not ModifiedResNet / timm towers)")
        if clip.visual.attn_pool is not None:
            raise ConfigError("open_clip image towers with an attentional pooler are not supported")
        self.clip = clip
        self.mode = mode
        self.patch_input_bits = patch_input_bits
        self.quantize_classifier = bool(quantize_classifier)  # vision mode only (an ablation when False)
        self.register_buffer("class_tokens", class_tokens.long(), persistent=False)
        embed_dim = int(clip.visual.output_dim)
        self.classifier = nn.Linear(embed_dim, class_tokens.shape[0], bias=False)
        rebuild_attention(self.clip)
        self.refresh_classifier()  # from the text tower as it is now (float: before any quantization)

    @property
    def text(self) -> _Text:
        return _Text(self.clip)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        tx = self.text
        x, kw = tx.embed(ids)
        for blk in tx.transformer.resblocks:
            x = blk(x, **kw)
        return tx.head(x, ids)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.visual(images)

    @torch.no_grad()
    def class_embeddings(self, batch_classes: int = 50) -> torch.Tensor:
        """(classes, embed_dim): per class the mean of its L2-normalised prompt embeddings,
        normalised again (the OpenAI zero-shot recipe)."""
        C, T, L = self.class_tokens.shape
        out = []
        for s in range(0, C, batch_classes):
            ids = self.class_tokens[s : s + batch_classes].reshape(-1, L)
            e = F.normalize(self.encode_text(ids), dim=-1).reshape(-1, T, self.classifier.in_features)
            out.append(F.normalize(e.mean(1), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def refresh_classifier(self) -> None:
        """Rows of the classifier = the class embeddings of the text tower in its current state."""
        w = self.class_embeddings()
        cls = self.classifier
        target = getattr(cls, "fp_weight", None)
        cls.weight.data.copy_(w.to(cls.weight.dtype))
        if target is not None:  # a quantized wrapper with a detached float path (not used: the classifier stays float)
            target.copy_(w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.normalize(self.encode_image(images), dim=-1))


class OpenCLIPAdapter(ModelAdapter):
    """Units: ``clip.visual.transformer.resblocks.i`` (both modes), then the text tower's
    ``...transformer.resblocks.i`` (vision_text). Blocks are open_clip's own, called
    ``block(x, attn_mask=...)`` (``attn_mask`` None for the image tower)."""

    VIS = "clip.visual.transformer.resblocks"

    def __init__(self, model: ZeroShotCLIP):
        if not isinstance(model, ZeroShotCLIP):
            raise TypeError("OpenCLIPAdapter wraps a qwt.models.open_clip.ZeroShotCLIP")
        super().__init__(model)

    @property
    def mode(self) -> str:
        return self.model.mode

    def _vis(self):
        return self.model.clip.visual

    def _text_prefix(self) -> str:
        return f"{self.model.text.prefix}.transformer.resblocks"

    def _n_vis(self) -> int:
        return len(self._vis().transformer.resblocks)

    # -- the block view ---------------------------------------------------------------------
    def stem(self, batch) -> State:
        images, ids = (batch["image"], batch.get("text")) if isinstance(batch, dict) else (batch, None)
        if self.mode == "vision_text" and ids is None:
            raise ValueError("mode vision_text calibrates on image-caption pairs: a batch is {'image': ..., 'text': ...}")
        v = self._vis()
        h = v._embeds(images)
        if not v.transformer.batch_first:
            h = h.transpose(0, 1)
        extras = {"text": ids} if self.mode == "vision_text" else {}
        return State(h, {}, extras)

    def units(self) -> list[Unit]:
        us = [Unit(f"{self.VIS}.{i}") for i in range(self._n_vis())]
        if self.mode == "vision_text":
            p = self._text_prefix()
            us += [Unit(f"{p}.{i}") for i in range(len(self.model.text.transformer.resblocks))]
        return us

    def _first_text(self, unit: Unit) -> bool:
        return self.mode == "vision_text" and unit.name == f"{self._text_prefix()}.0"

    def unit_input(self, unit, state):
        if self._first_text(unit):  # the image tokens are done: the caption tokens enter here
            return self.model.text.embed(state.extras["text"])
        return super().unit_input(unit, state)

    def next_state(self, unit, state, x, kwargs, y):
        extras = {**state.extras, "image_h": state.h} if self._first_text(unit) else state.extras
        return State(y, kwargs, extras)

    def _image_embedding(self, h) -> torch.Tensor:
        v = self._vis()
        if not v.transformer.batch_first:
            h = h.transpose(0, 1)
        pooled, _ = v._pool(h)
        return pooled @ v.proj if v.proj is not None else pooled

    def features(self, state):
        """Normalised image embedding (vision); [image | text] normalised embeddings (vision_text)."""
        if self.mode == "vision":
            return F.normalize(self._image_embedding(state.h), dim=-1)
        img = F.normalize(self._image_embedding(state.extras["image_h"]), dim=-1)
        txt = F.normalize(self.model.text.head(state.h, state.extras["text"]), dim=-1)
        return torch.cat([img, txt], dim=-1)

    def head(self, state):
        """Zero-shot logits (vision); the embeddings of the pairs (vision_text: the classifier is
        not part of the quantized chain)."""
        if self.mode == "vision":
            return self.model.classifier(self.features(state))
        return self.features(state)

    # -- family facts -------------------------------------------------------------------------
    def _quantized_prefixes(self) -> list[str]:
        out = ["clip.visual."]
        if self.mode == "vision":
            if getattr(self.model, "quantize_classifier", True):
                out.append("classifier")
        else:
            out.append(self._text_prefix() + ".")
        return out

    def float_layers(self):
        keep = self._quantized_prefixes()
        return {n for n, m in self.model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(n == k or n.startswith(k) for k in keep)}

    def fixed_bits(self):
        b = self.model.patch_input_bits
        return {} if b is None else {"clip.visual.conv1": {"a": int(b)}}

    def quant_roles(self):
        left = []
        for p in self._quantized_prefixes():
            mod = self.get(p.rstrip("."))
            left += multihead_attention_left(mod, p)
        if left:
            raise ConfigError(f"nn.MultiheadAttention left in a tower that is quantized: {left[:4]}{'...' if len(left) > 4 else ''}. "
                              "Its forward reads the packed in_proj_weight directly, so its Linears would stay float; "
                              "rebuild it with qwt.models.open_clip.rebuild_attention(model)")
        return super().quant_roles()

    def norm_linear_pairs(self):
        pairs = []
        for u in self.units():
            pairs += [(f"{u.name}.ln_1", [f"{u.name}.attn.qkv"]), (f"{u.name}.ln_2", [f"{u.name}.mlp.c_fc"])]
        return pairs

    def trainable_head(self):
        return ["classifier"] if self.mode == "vision" else []

    def extra_precond(self, sites):
        """"v_proj": the v rows of the fused qkv -> out_proj's input columns."""
        from .base import fused_qkv_value_site

        if "v_proj" not in sites:
            return []
        sites_ = (fused_qkv_value_site(f"{u.name}.attn", self.get(f"{u.name}.attn.qkv"), self.get(f"{u.name}.attn.out_proj"))
                  for u in self.units())
        return [site for site in sites_ if site is not None]


# ---------------------------------------------------------------------------------------------
# building: hub / local checkpoints (model.source=open_clip) and the embedded CLIP


def check_clip_weights(model_cfg: dict) -> None:
    """Fail early (before data or models are touched) when the pretrained weights are not available."""
    if model_cfg.get("source") != "open_clip":
        return
    register_model_config(model_cfg)
    name, tag, ckpt = model_cfg["open_clip_name"], model_cfg.get("pretrained"), model_cfg.get("checkpoint")
    if ckpt:
        if not os.path.isfile(str(ckpt)):
            raise ConfigError(f"model.checkpoint={ckpt} does not exist: give the path of the {name} ({tag}) weights "
                              "(e.g. open_clip_pytorch_model.bin from the hub repo timm/vit_base_patch32_clip_224.openai)")
        if name not in __import__("open_clip").list_models():
            raise ConfigError(f"model.open_clip_name={name!r} is not an open_clip model (see open_clip.list_models(); "
                              "or give your own config with model.open_clip_config=/path/<name>.json)")
        return
    if not tag:
        raise ConfigError(f"model.pretrained is not set for {name}: give a pretrained tag (e.g. openai) or model.checkpoint=/path")
    import open_clip

    if name not in open_clip.list_models():
        raise ConfigError(f"model.open_clip_name={name!r} is not an open_clip model (see open_clip.list_models(); "
                          "or give your own config with model.open_clip_config=/path/<name>.json)")
    if tag not in open_clip.list_pretrained_tags_by_model(name):
        raise ConfigError(f"model.pretrained={tag!r} is not a pretrained tag of open_clip model {name!r} "
                          f"(tags: {open_clip.list_pretrained_tags_by_model(name)})")
    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "")
    if not _in_hf_cache(hub):
        raise ConfigError(f"the {name} ({tag}) weights are not in the Hugging Face cache (hub repo {hub.rstrip('/') or '?'}) "
                          "and no network is assumed: download them elsewhere and set model.checkpoint=/path/to/"
                          "open_clip_pytorch_model.bin (or fill the HF cache and set HF_HUB_OFFLINE=1)")


def register_model_config(model_cfg: dict) -> None:
    """``model.open_clip_config``: a model config JSON of one's own (open_clip's format), registered
    under its file name so that ``model.open_clip_name`` can name it."""
    path = model_cfg.get("open_clip_config")
    if not path:
        return
    if not os.path.isfile(str(path)):
        raise ConfigError(f"model.open_clip_config={path} does not exist: give an open_clip model config .json")
    import open_clip

    open_clip.add_model_config(str(path))


def _in_hf_cache(hub: str) -> bool:
    if not hub:
        return False
    repo = hub.rstrip("/").split("/")
    repo_id = "/".join(repo[:2])
    try:
        from huggingface_hub import try_to_load_from_cache

        for fn in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            p = try_to_load_from_cache(repo_id, fn)
            if isinstance(p, str) and os.path.isfile(p):
                return True
    except Exception:
        return False
    return False


def load_clip(model_cfg: dict, log=print):
    """(float CLIP, tokenizer, (train transform, eval transform)) for ``model.source``:
    ``open_clip`` (any open_clip model name + pretrained tag or local checkpoint) or
    ``open_clip_embedded`` (the embedded CLIP, shipped weights)."""
    src = model_cfg.get("source")
    if src == "open_clip_embedded":
        from . import clip_embedded

        clip, tok = clip_embedded.load(model_cfg, log)
        return clip, tok, (None, None)
    if src != "open_clip":
        raise ConfigError(f"model.source={src!r}: the zero-shot task takes open_clip or open_clip_embedded models")
    import open_clip

    check_clip_weights(model_cfg)
    name = model_cfg["open_clip_name"]
    pretrained = model_cfg.get("checkpoint") or model_cfg.get("pretrained")
    try:
        clip, pre_train, pre_val = open_clip.create_model_and_transforms(name, pretrained=pretrained, precision="fp32")
    except Exception as e:
        raise ConfigError(f"could not build open_clip model {name!r} with pretrained={pretrained!r} "
                          f"({type(e).__name__}: {str(e)[:200]}): check model.open_clip_name / model.checkpoint") from e
    return clip.eval(), open_clip.get_tokenizer(name), (pre_train, pre_val)


def build_clip_module(model_cfg: dict, log=print) -> nn.Module:
    """``SOURCES`` entry: the float CLIP alone (attention rebuilt; no classifier)."""
    clip = load_clip(model_cfg, log)[0]
    rebuild_attention(clip)
    return clip
