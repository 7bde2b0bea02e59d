"""mmdet two-stage detectors with a Swin backbone (Mask R-CNN, Cascade Mask R-CNN), block by block.

A batch (what ``stem`` consumes) is a dict of tensors, so calibration batches concatenate and
slice like images (``qwt.models.base.batch_cat``):
  inputs        (B, 3, H, W) normalized and padded images (the detector's data preprocessor ran)
  img_shape     (B, 2) size of each image after the test pipeline's resize (before padding)
  ori_shape     (B, 2) size of the original image
  scale_factor  (B, 2) (w, h) resize factors (predictions are rescaled to the original image)

stem      backbone.patch_embed (+ absolute position embedding): tokens (B, L, C); the keyword
          state carries ``hw_shape`` (SwinBlock(x, hw_shape)); ``extras`` carries the image metas
          and the multi-scale outputs collected so far.
units     every SwinBlock of every stage; a stage's PatchMerging (``stages.{i-1}.downsample``) is the
          uncompensated ``pre`` of stage i's first block; it changes hw_shape.
          After a stage's last block its output goes through ``backbone.norm{i}`` into
          ``extras["outs"]`` (what the neck reads).
head      neck (FPN) + RPN + RoI heads in test mode -> one ``InstanceData`` per image (bboxes,
          scores, labels, masks), rescaled to the original image.
features  the backbone's multi-scale outputs, flattened and concatenated (distillation target of
          QFT / QwT* on detection).

Quantization (stage 1): every Conv2d and Linear of the detector (backbone, FPN, RPN, box and mask
heads) at the run's bits; the patch-embedding input 8-bit (``fixed_bits``); the mask head's
deconvolution (ConvTranspose2d), RoIAlign and NMS stay float (they are no Conv2d / Linear);
attention matmuls of the window attention quantized like timm Swin's (log-sqrt2 softmax).
Inputs of Linears after a LayerNorm (qkv, fc1, PatchMerging's reduction) are RepQ-ViT's post-norm
sites (``norm_linear_pairs``).
"""
from __future__ import annotations

import torch
from mmdet.models.backbones.swin import WindowMSA

from ..quant.modules import QuantMatMul
from ..quant.patch import LayerQuant
from .base import ModelAdapter, PrecondSite, State, Unit, fused_qkv_value_site

META_KEYS = ("img_shape", "ori_shape", "scale_factor")


class QuantWindowMSA(WindowMSA):
    """mmdet's ``WindowMSA`` with explicit, quantizable matmuls (same arithmetic as the original)."""

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.scale_after:
            attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        else:
            attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        ws = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(ws, ws, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def _patch_window_msa(m, lq: LayerQuant, max_elements):
    if isinstance(m, QuantWindowMSA):
        raise TypeError("QuantWindowMSA is already patched: quantize a fresh float model")
    m.__class__ = QuantWindowMSA
    qk = lq.qk or (None, None)
    pv = lq.pv or (None, None)
    m.matmul1 = QuantMatMul(qk[0], qk[1], max_elements)
    m.matmul2 = QuantMatMul(pv[0], pv[1], max_elements)
    m.scale_after = bool(lq.scale_after)
    return m


def metas_from_samples(data_samples) -> dict:
    """The batch's meta tensors from mmdet ``DetDataSample``s."""
    out = {}
    for key in META_KEYS:
        vals = []
        for s in data_samples:
            v = s.metainfo[key] if key in s.metainfo else (1.0, 1.0)
            vals.append([float(t) for t in v][:2])
        out[key] = torch.tensor(vals, dtype=torch.float32)
    return out


def samples_from_metas(extras: dict, batch_input_shape) -> list:
    """``DetDataSample``s carrying the metainfo mmdet's heads read in test mode."""
    from mmdet.structures import DetDataSample

    n = extras["img_shape"].shape[0]
    out = []
    for i in range(n):
        s = DetDataSample()
        ih, iw = (int(round(float(t))) for t in extras["img_shape"][i].tolist())
        oh, ow = (int(round(float(t))) for t in extras["ori_shape"][i].tolist())
        sf = tuple(float(t) for t in extras["scale_factor"][i].tolist())
        s.set_metainfo(dict(img_shape=(ih, iw), ori_shape=(oh, ow), scale_factor=sf,
                            batch_input_shape=tuple(batch_input_shape), pad_shape=tuple(batch_input_shape)))
        out.append(s)
    return out


class MMDetSwinAdapter(ModelAdapter):
    """Adapter over an mmdet ``TwoStageDetector`` (MaskRCNN / CascadeRCNN) with mmdet's ``SwinTransformer``."""

    unit_layout = "channels_last"

    @property
    def backbone(self):
        return self.model.backbone

    def _stages(self):
        return self.get("backbone.stages")

    # -- block view ---------------------------------------------------------------------------
    def stem(self, batch) -> State:
        bb = self.backbone
        x = batch["inputs"]
        h, hw = self.get("backbone.patch_embed")(x)
        if getattr(bb, "use_abs_pos_embed", False):
            h = h + bb.absolute_pos_embed
        h = bb.drop_after_pos(h)
        extras = {k: batch[k] for k in META_KEYS}
        extras["input_shape"] = tuple(x.shape[-2:])
        extras["outs"] = []
        return State(h, {"hw_shape": tuple(hw)}, extras)

    def units(self) -> list[Unit]:
        out = []
        for s, stage in enumerate(self._stages()):
            for j in range(len(stage.blocks)):
                pre = f"backbone.stages.{s - 1}.downsample" if j == 0 and s > 0 else None
                out.append(Unit(f"backbone.stages.{s}.blocks.{j}", pre))
        return out

    def unit_input(self, unit: Unit, state: State):
        if unit.pre is None:
            return state.h, state.kwargs
        x, hw = self.get(unit.pre)(state.h, state.kwargs["hw_shape"])
        return x, {**state.kwargs, "hw_shape": tuple(hw)}

    def next_state(self, unit: Unit, state: State, x, kwargs: dict, y) -> State:
        parts = unit.name.split(".")
        s, j = int(parts[2]), int(parts[4])
        extras = state.extras
        if j == len(self._stages()[s].blocks) - 1 and s in self.backbone.out_indices:
            hw = kwargs["hw_shape"]
            out = self.get(f"backbone.norm{s}")(y)
            out = out.view(-1, *hw, self.backbone.num_features[s]).permute(0, 3, 1, 2).contiguous()
            extras = {**extras, "outs": list(extras["outs"]) + [out]}
        return State(y, kwargs, extras)

    def neck(self, state: State):
        outs = tuple(state.extras["outs"])
        return self.get("neck")(outs) if getattr(self.model, "with_neck", True) else outs

    def head(self, state: State):
        """Test-mode RPN + RoI heads: a list of ``InstanceData`` (one per image, original scale)."""
        feats = self.neck(state)
        samples = samples_from_metas(state.extras, state.extras["input_shape"])
        rpn = self.get("rpn_head").predict(feats, samples, rescale=False)
        return self.get("roi_head").predict(feats, rpn, samples, rescale=True)

    def features(self, state: State):
        return torch.cat([o.flatten(1) for o in state.extras["outs"]], dim=1)

    # -- family facts -------------------------------------------------------------------------
    def attention_types(self):
        return (WindowMSA,)

    def patchers(self):
        return {WindowMSA: _patch_window_msa}

    def fixed_bits(self):
        return {"backbone.patch_embed.projection": {"w": None, "a": 8}}  # patch embedding input 8-bit

    def norm_linear_pairs(self):
        pairs = []
        for s, stage in enumerate(self._stages()):
            for j in range(len(stage.blocks)):
                b = f"backbone.stages.{s}.blocks.{j}"
                pairs += [(f"{b}.norm1", [f"{b}.attn.w_msa.qkv"]), (f"{b}.norm2", [f"{b}.ffn.layers.0.0"])]
            ds = getattr(stage, "downsample", None)
            if ds is not None and getattr(ds, "norm", None) is not None:
                pairs.append((f"backbone.stages.{s}.downsample.norm", [f"backbone.stages.{s}.downsample.reduction"]))
        return pairs

    def extra_precond(self, sites) -> list[PrecondSite]:
        """QFT's "v_proj" sites: the v part of each window attention's qkv -> its proj."""
        if "v_proj" not in sites:
            return []
        sites_ = (fused_qkv_value_site(n, m.qkv, m.proj) for n, m in self.model.named_modules()
                  if isinstance(m, QuantWindowMSA))
        return [site for site in sites_ if site is not None]

    def clone(self, memo=None):
        import copy

        return type(self)(copy.deepcopy(self.model, memo))
