"""The block-wise view every calibration algorithm uses, and the family facts PTQ methods need.

An adapter wraps one model instance and exposes
  stem(batch) -> State      everything before the first compensated unit. A ``State`` carries the
                            tensor the units transform (``h``), the keyword arguments every unit is
                            called with (``kwargs``: attention masks, position embeddings,
                            conditioning, spatial shape) and what the head needs besides ``h``
                            (``extras``: e.g. multi-scale features collected along the way)
  units()                   ordered Units; each names a block (the thing QwT compensates) and an
                            optional ``pre`` module run before it and not compensated
                            (Swin's PatchMerging)
  run_unit(unit, state)     unit_input -> block(x, **kwargs) -> unit_output -> next_state
  head(state) -> output     everything after the last unit
  features(state)           what distillation matches before the task head (classification: the
                            pre-logits features; QwT*'s MSE target, QFT's ``features`` target)
and the family knowledge that methods must not have:
  quant_roles()             what stage 1 quantizes and how (``Role`` per module name)
  norm_linear_pairs()       norm -> Linears it feeds (RepQ-ViT's reparameterization, QFT's
                            preconditioning); LayerNorm and RMSNorm alike
  precond_pairs(sites)      QFT's foldable preconditioning sites
  patchers()                quant wrappers for the family library's own module types (attention),
                            imported lazily with the adapter
  trainable_head()          modules QwT* trains besides the branches (the classifier)
Adapters look modules up by name on every call, so replacing a unit (a compensated wrapper) is
just ``set_module``. Adapters are registered lazily by the library class they wrap, so that
importing ``qwt`` imports no model library.
"""
from __future__ import annotations

import copy
import importlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn


def move(x, device):
    """``x`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, State):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(move(v, device) for v in x)
    if isinstance(x, list):
        return [move(v, device) for v in x]
    if isinstance(x, dict):
        return {k: move(v, device) for k, v in x.items()}
    return x


def batch_cat(batches: list):
    """One batch from a list of batches (tensors, or tuples / dicts of batch-first tensors)."""
    b0 = batches[0]
    if isinstance(b0, torch.Tensor):
        return torch.cat(batches)
    if isinstance(b0, (tuple, list)):
        return type(b0)(batch_cat([b[i] for b in batches]) for i in range(len(b0)))
    if isinstance(b0, dict):
        return {k: batch_cat([b[k] for b in batches]) for k in b0}
    return b0  # a constant shared by every batch


def batch_take(batch, idx: torch.Tensor):
    """The samples ``idx`` of a batch (see ``batch_cat``)."""
    if isinstance(batch, torch.Tensor):
        return batch[idx.to(batch.device)]
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_take(b, idx) for b in batch)
    if isinstance(batch, dict):
        return {k: batch_take(v, idx) for k, v in batch.items()}
    return batch


def batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)):
        return batch_len(batch[0])
    if isinstance(batch, dict):
        return batch_len(next(iter(batch.values())))
    raise TypeError(f"cannot tell the batch size of {type(batch).__name__}")


@dataclass
class State:
    """What flows from one unit to the next (see the module docstring)."""

    h: Any
    kwargs: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    def to(self, device) -> "State":
        return State(move(self.h, device), move(self.kwargs, device), move(self.extras, device))


@dataclass(frozen=True)
class Unit:
    name: str
    pre: str | None = None


@dataclass(frozen=True)
class Role:
    """How stage 1 treats one module.

    kind: "linear" (a Linear / Conv2d: weight and input quantizer) or "attention" (a module whose
    two matmuls run through QuantMatMul; the adapter's ``patchers`` make them explicit).
    edge: a layer the papers keep at W8A8 (patch embedding, first conv, classifier) when the PTQ
    option ``keep_8bit`` is on. w_bits / a_bits: fixed bit-widths whatever the run's bits (e.g.
    CLIP's patch conv input is always 8-bit). quantize_input: False for a weight-only layer.
    post_norm: the input comes from a norm (RepQ-ViT calibrates it per channel, then folds).
    """

    kind: str = "linear"
    edge: bool = False
    w_bits: int | None = None
    a_bits: int | None = None
    quantize_input: bool = True
    post_norm: bool = False


@dataclass
class PrecondSite:
    """One QFT preconditioning site: a per-channel factor s (``channels`` of them) that divides
    the producer side and multiplies the consumer side. ``entries``: (module, tensor name, dim,
    offset, inverse) for every tensor it touches (inverse: divided by s)."""

    name: str
    site: str
    channels: int
    entries: list


def fused_qkv_value_site(name: str, qkv, proj) -> "PrecondSite | None":
    """QFT's "v_proj" site of one attention with a fused qkv Linear feeding ``proj`` through
    attn @ v (linear in v: the softmax weights mix tokens, not channels): the v rows of qkv (its
    weight, bias and per-channel weight scale) are divided by s, proj's input columns multiplied.
    None when either Linear is not quantized."""
    from ..quant.modules import _QuantWeighted

    if not (isinstance(qkv, _QuantWeighted) and isinstance(proj, _QuantWeighted)):
        return None
    d = proj.in_features
    entries = [(qkv, "weight", 0, 2 * d, True)]
    if qkv.bias is not None:
        entries.append((qkv, "bias", 0, 2 * d, True))
    if qkv.per_channel_weight_scale():
        entries.append((qkv.w_quant, "scale", 0, 2 * d, True))
    entries.append((proj, "weight", 1, 0, False))
    return PrecondSite(f"{name}.v", "v_proj", d, entries)


class ModelAdapter:
    unit_layout = "channels_last"  # unit inputs/outputs are (..., C); "nchw" for CNN blocks

    def __init__(self, model: nn.Module):
        self.model = model

    # -- the block view (to implement) ------------------------------------------------------
    def stem(self, batch) -> State:
        raise NotImplementedError

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def head(self, state: State):
        raise NotImplementedError

    def features(self, state: State):
        """Distillation target before the task head (default: the head's output)."""
        return self.head(state)

    def unit_input(self, unit: Unit, state: State) -> tuple[Any, dict]:
        """(x, kwargs) the unit's block itself receives (after ``pre``)."""
        x = self.get(unit.pre)(state.h) if unit.pre is not None else state.h
        return x, state.kwargs

    def unit_output(self, out):
        """The tensor QwT compensates, from what the block returned (a tuple's first element)."""
        return out[0] if isinstance(out, tuple) else out

    def next_state(self, unit: Unit, state: State, x, kwargs: dict, y) -> State:
        """The state after ``unit`` (default: its output, the same kwargs and extras)."""
        return State(y, kwargs, state.extras)

    def call_unit(self, unit: Unit, x, kwargs: dict):
        return self.unit_output(self.get(unit.name)(x, **kwargs))

    def run_unit(self, unit: Unit, state: State) -> State:
        x, kw = self.unit_input(unit, state)
        return self.next_state(unit, state, x, kw, self.call_unit(unit, x, kw))

    def forward(self, batch):
        s = self.stem(batch)
        for u in self.units():
            s = self.run_unit(u, s)
        return self.head(s)

    # -- family facts for the methods -------------------------------------------------------
    def attention_types(self) -> tuple[type, ...]:
        """Module types whose two matmuls are quantized (role "attention")."""
        return ()

    def patchers(self) -> dict[type, Callable]:
        """Quant wrappers for this family's library types: {float type: fn(module, LayerQuant, max_elements)}."""
        return {}

    def edge_layers(self) -> set[str]:
        """Layers kept at W8A8 by ``keep_8bit`` (patch embedding / first conv, classifier)."""
        return set()

    def float_layers(self) -> set[str]:
        """Linear / Conv layers that stay float (not quantized at all)."""
        return set()

    def weight_only_layers(self) -> set[str]:
        """Layers whose weights are quantized but whose input is not."""
        return set()

    def fixed_bits(self) -> dict[str, dict]:
        """{layer: {"w": bits or None, "a": bits or None}}: bit-widths fixed whatever the run's."""
        return {}

    def quantizable(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv2d))

    def quant_roles(self) -> dict[str, Role]:
        """{module name: Role} of everything stage 1 quantizes (composed from the hooks above)."""
        edge, skip, w_only = self.edge_layers(), self.float_layers(), self.weight_only_layers()
        post = {lin for _, lins in self.norm_linear_pairs() for lin in lins}
        fixed = self.fixed_bits()
        att = self.attention_types()
        roles = {}
        for name, m in self.model.named_modules():
            if name in skip:
                continue
            if att and isinstance(m, att):
                roles[name] = Role(kind="attention")
            elif self.quantizable(name, m):
                f = fixed.get(name, {})
                roles[name] = Role(edge=name in edge, w_bits=f.get("w"), a_bits=f.get("a"),
                                   quantize_input=name not in w_only, post_norm=name in post)
        return roles

    def norm_linear_pairs(self) -> list[tuple[str, list[str]]]:
        """(norm name, names of the Linears it feeds)."""
        return []

    def trainable_head(self) -> list[str]:
        """Modules QwT* trains besides the compensation (the classifier)."""
        return []

    def precond_pairs(self, sites) -> list[PrecondSite]:
        """QFT's foldable preconditioning sites of ``sites`` (see ``qwt/compensation/qft.py``).
        Default: every norm -> Linear pair ("ln_linear") plus the family's own (``extra_precond``)."""
        from ..quant.modules import _QuantWeighted

        out = []
        if "ln_linear" in sites:
            for norm_name, lin_names in self.norm_linear_pairs():
                norm = self.get(norm_name)
                w_owner = norm.norm if getattr(norm, "adds_bias", False) else norm  # RepQ-ViT's NormWithBias
                lins = [self.get(n) for n in lin_names]
                if getattr(w_owner, "weight", None) is None or not all(isinstance(m, _QuantWeighted) for m in lins):
                    continue
                entries = [(w_owner, "weight", 0, 0, True)]
                if getattr(norm, "bias", None) is not None:
                    entries.append((norm, "bias", 0, 0, True))
                entries += [(m, "weight", 1, 0, False) for m in lins]
                out.append(PrecondSite(norm_name, "ln_linear", w_owner.weight.numel(), entries))
        return out + self.extra_precond(sites)

    def extra_precond(self, sites) -> list[PrecondSite]:
        return []

    # -- shared -----------------------------------------------------------------------------
    def get(self, name: str) -> nn.Module:
        """The module called ``name``, looking through units wrapped by a compensation (a wrapper
        keeps the original block as ``.block``)."""
        mod = self.model
        if not name:
            return mod
        for part in name.split("."):
            if not hasattr(mod, part) and getattr(mod, "wraps_block", False):
                mod = mod.block
            mod = getattr(mod, part)
        return mod

    def set_module(self, name: str, module: nn.Module):
        parent, _, child = name.rpartition(".")
        setattr(self.get(parent) if parent else self.model, child, module)

    def clone(self, memo: dict | None = None) -> "ModelAdapter":
        return type(self)(copy.deepcopy(self.model, memo))


class FloatView(ModelAdapter):
    """The float path of another adapter's model, without a second copy: every call runs with all
    quantization and compensation off (``float_view``). The teacher of distillation losses when
    ``runtime.memory=lean``."""

    def __init__(self, inner: ModelAdapter):
        self.inner = inner
        self.model = inner.model
        self.unit_layout = inner.unit_layout

    def _float(self, fn, *args):
        from ..quant.modules import float_view

        with float_view(self.model):
            return fn(*args)

    def stem(self, batch):
        return self._float(self.inner.stem, batch)

    def units(self):
        return self.inner.units()

    def run_unit(self, unit, state):
        return self._float(self.inner.run_unit, unit, state)

    def head(self, state):
        return self._float(self.inner.head, state)

    def features(self, state):
        return self._float(self.inner.features, state)

    def forward(self, batch):
        return self._float(self.inner.forward, batch)

    def clone(self, memo=None):
        raise TypeError("a FloatView is a view of another model: clone the model it views")


# ---------------------------------------------------------------------------------------------
# registry: (library module, class name) -> "qwt.models.<adapter module>:<class>", resolved lazily


ADAPTERS: list[tuple[str, str, str]] = [
    ("timm.models.vision_transformer", "VisionTransformer", "qwt.models.timm_vit:TimmViTAdapter"),
    ("timm.models.swin_transformer", "SwinTransformer", "qwt.models.timm_swin:TimmSwinAdapter"),
    ("timm.models.resnet", "ResNet", "qwt.models.resnet:TimmResNetAdapter"),
    ("transformers.models.llama.modeling_llama", "LlamaForCausalLM", "qwt.models.llama:LlamaAdapter"),
    ("mmdet.models.detectors.two_stage", "TwoStageDetector", "qwt.models.mmdet_swin:MMDetSwinAdapter"),
    ("diffusers.models.transformers.dit_transformer_2d", "DiTTransformer2DModel", "qwt.models.dit:DiTAdapter"),
]


def register_adapter(library_module: str, class_name: str, adapter: str, first: bool = True):
    """Register ``adapter`` ("package.module:Class") for models that are instances of
    ``library_module.class_name``. Nothing is imported until a model of that library is seen."""
    entry = (library_module, class_name, adapter)
    if entry not in ADAPTERS:
        ADAPTERS.insert(0, entry) if first else ADAPTERS.append(entry)


def _load(path: str):
    mod, _, cls = path.partition(":")
    return getattr(importlib.import_module(mod), cls)


def adapter_for(model: nn.Module) -> ModelAdapter:
    if isinstance(model, AdaptedModel):
        return model.make_adapter()
    for lib, cls_name, path in ADAPTERS:
        lib_mod = sys.modules.get(lib)  # a model of that library exists only if the library is imported
        if lib_mod is not None and isinstance(model, getattr(lib_mod, cls_name)):
            return _load(path)(model)
    raise TypeError(f"no block adapter for {type(model).__name__}; add one in qwt/models/ and register it "
                    "with qwt.models.base.register_adapter(library module, class name, 'qwt.models.<file>:<Adapter>')")


class AdaptedModel(nn.Module):
    """Base of models the project composes itself (a task's wrapper around library parts): they
    name their adapter class, so ``adapter_for`` needs no registry entry."""

    adapter_class: str = ""

    def make_adapter(self) -> ModelAdapter:
        return _load(self.adapter_class)(self)
