"""QFT (Finkelstein et al., ECCV-W 2022): quantization-aware finetuning of all quantization degrees
of freedom at once, end to end, by distillation from the float model on a small calibration set.

Degrees of freedom (groups; each switchable and with its own learning rate, ``cfg["train"]`` /
``cfg["lr"]``):
  weight    latent float weights of every quantized Linear / Conv, through straight-through rounding
  bias      the biases those layers already have (none is added)
  w_scale   weight step sizes (per output channel for every stage-1 method here), LSQ gradients
  a_scale   activation step sizes (per tensor): inputs of quantized layers and both operands of
            the attention matmuls (incl. the log-sqrt2 softmax quantizer's delta), LSQ gradients
  precond   per-channel preconditioning factors s = exp(t) > 0 (cross-layer-equalization form):
            the producer's output channel c is divided by s_c, the consumer's input column c is
            multiplied by s_c. Exact in float; folded into the graph after training. The sites
            come from the model's adapter (``precond_pairs``), which knows its family:
              ln_linear  norm -> Linear (ViT/Swin norm1 -> attn.qkv, norm2 -> mlp.fc1, Swin's
                         downsample.norm -> reduction; LayerNorm or RMSNorm): norm gamma (and
                         beta, if it has one) /= s; W[:, c] *= s_c.
              v_proj     v part of attn.qkv -> attn.proj (attention is linear in v; the softmax
                         weights mix tokens, not channels): qkv rows and bias of v /= s, and the
                         v rows' per-channel weight step sizes /= s too, so s moves the v
                         activation / proj input ranges without re-rounding the qkv weight codes;
                         proj W[:, c] *= s_c. The v quantizer (matmul2's second operand) is
                         per-tensor for every stage-1 method here; the fold is exact whatever its
                         granularity, since it only rewrites the weights around v.
              bn_conv    ResNet, inside a block: BatchNorm -> ReLU -> next conv (bn1 -> conv2 in
                         BasicBlock; bn1 -> conv2 and bn2 -> conv3 in Bottleneck). BatchNorm stays
                         float and unfolded: BN weight, bias /= s (positive factors commute with
                         ReLU); conv W[:, c] *= s_c.
            Not preconditioned: mlp.fc1 -> GELU -> mlp.fc2 (GELU is not positively homogeneous:
            GELU(y / s) != GELU(y) / s), anything across a residual add (the scale would have to
            be applied to the whole residual stream), the ResNet stem and downsample branches.
  Zero-points stay fixed (stage-1 values).

Loss (our reading; the paper's exact loss is not recovered): ``output_weight`` x distance between
the quantized and float model outputs (``target``: ``output`` = the task head's output, e.g.
logits, or ``features`` = the adapter's pre-head features; ``distance``: mse, or kl on logits) + ``block_weight`` x mean over units of MSE(quantized unit output, float unit
output) on the same input image. Adam, per-group learning rates, cosine or constant schedule,
``epochs`` over ``num_samples`` calibration images reshuffled every epoch. The model runs in eval
mode (BatchNorm statistics and dropout fixed). Float teacher outputs are computed once when
``block_weight`` is 0.

Implementation: the preconditioning factors are torch parametrizations of the tensors they touch,
so the training forward evaluates exactly the expressions that the fold later stores (gamma / s,
W * s, ...); after training ``finalize`` folds them (bit for bit), turns the trained step sizes
back into buffers, and freezes the integer weight codes: the model is in stage-1 form again
(the float path -- quantization off -- is the original float model, as QwT needs). ``export``
returns that deployment form (integer codes, scales, zero-points, biases, activation quantizers,
every float tensor incl. the folded LayerNorm / BatchNorm affines); ``load_export`` writes it
into another copy of the model, which then reproduces the trained model's outputs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .. import dist
from ..errors import ConfigError
from ..engine import run_chain
from ..models.base import batch_cat, batch_len, batch_take
from ..quant import set_quant_state
from ..quant.modules import QuantModule, Quantizer, _act_quantizers, _QuantWeighted
from ..quant.quantizer import quantize_codes
from .base import CompContext

GROUPS = ("weight", "bias", "w_scale", "a_scale", "precond")
SITES = ("ln_linear", "v_proj", "bn_conv")
RELATIVE = ("weight", "w_scale", "a_scale")  # groups whose lr is relative to a grid step (see QFT.param_groups)
SCALE_EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# preconditioning factors


class _ChannelFactor(nn.Module):
    """Parametrization: tensor -> tensor * f or tensor / f along ``dim``, f = exp(t) placed at
    [offset, offset + len(t)) (ones elsewhere). ``t`` is held in a list so it is not registered
    under the module it parametrizes (the trainer owns it)."""

    def __init__(self, t: nn.Parameter, dim: int, offset: int, inverse: bool):
        super().__init__()
        self._t = [t]
        self.dim, self.offset, self.inverse = dim, offset, inverse

    def factor(self, size: int) -> torch.Tensor:
        s = self._t[0].exp()
        n = s.numel()
        if self.offset or n != size:
            s = torch.cat([s.new_ones(self.offset), s, s.new_ones(size - self.offset - n)])
        return s

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        shape = [1] * w.dim()
        shape[self.dim] = -1
        f = self.factor(w.shape[self.dim]).to(w.dtype).view(shape)
        return w / f if self.inverse else w * f


@dataclass
class PrecondPair:
    """One site: ``t`` (log-factors) and the tensors it touches, as (module, tensor name, dim,
    offset, inverse). Entries on quantized layers also name their float-path twin."""

    name: str
    site: str
    t: nn.Parameter
    entries: list = field(default_factory=list)


def find_pairs(adapter, sites=SITES) -> list:
    """The adapter's foldable preconditioning sites of ``sites`` (``PrecondSite`` list)."""
    bad = set(sites) - set(SITES)
    if bad:
        raise ConfigError(f"compensation.qft.precond_sites: unknown {sorted(bad)}; choose from {list(SITES)}")
    return adapter.precond_pairs(tuple(sites))


# ---------------------------------------------------------------------------------------------
# the trainer


class QFT:
    """Makes every degree of freedom of ``adapter.model`` trainable (in place); ``finalize()`` folds
    and returns the model to stage-1 form."""

    def __init__(self, adapter, train: dict | None = None, sites=SITES):
        train = {g: True for g in GROUPS} | dict(train or {})
        self.ref: dict[int, float] = {}  # per tensor: its scale of reference for relative learning rates
        self.adapter = adapter
        model = adapter.model
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, _QuantWeighted)}
        if not self.layers:
            raise ConfigError("compensation=qft needs a quantized model (ptq=fp has nothing to finetune)")
        self.requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.groups: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
        self.quantizers: list[Quantizer] = []
        for m in self.layers.values():
            m.detach_fp()  # the float path keeps the original weights
            if m.w_codes is not None:  # frozen codes (an earlier fold): continue from their values
                with torch.no_grad():
                    m.weight.data.copy_(m.quant_weight())
                m.w_codes = None
            if train["weight"]:
                self._add("weight", m.weight, float(m.w_quant.scale.abs().mean()) if m.w_quant is not None else 1.0)
            if train["bias"] and m.bias is not None:
                self._add("bias", m.bias)
            if m.w_quant is not None:
                self._prepare(m.w_quant, "w_scale" if train["w_scale"] else None)
        for m in model.modules():
            if isinstance(m, QuantModule):
                for q in _act_quantizers(m):
                    if q.calibrated and not q.spec.dynamic:
                        self._prepare(q, "a_scale" if train["a_scale"] else None)
        self.pairs: list[PrecondPair] = []
        self._parametrized: list[tuple[nn.Module, str]] = []
        if train["precond"]:
            device = next(model.parameters()).device
            for ps in find_pairs(adapter, sites):
                t = nn.Parameter(torch.zeros(ps.channels, device=device))
                pair = PrecondPair(ps.name, ps.site, t, ps.entries)
                for mod, tname, dim, offset, inverse in ps.entries:
                    parametrize.register_parametrization(mod, tname, _ChannelFactor(t, dim, offset, inverse))
                    if (mod, tname) not in self._parametrized:
                        self._parametrized.append((mod, tname))
                self.pairs.append(pair)
                self._add("precond", t)

    def _add(self, group, p, ref: float = 1.0):
        p.requires_grad_(True)
        self.groups[group].append(p)
        self.ref[id(p)] = ref

    def _prepare(self, q: Quantizer, group):
        q.ste = True  # straight-through rounding: gradients reach everything upstream
        if group is not None:
            q.make_scale_trainable()
            self._add(group, q.scale, float(q.scale.detach().abs().mean()))
        self.quantizers.append(q)

    def counts(self) -> dict:
        return {g: sum(p.numel() for p in ps) for g, ps in self.groups.items()}

    def param_groups(self, lr: dict, relative=RELATIVE):
        """Adam parameter groups. Groups in ``relative`` get one group per tensor with lr x that
        tensor's reference: the layer's mean weight step size for latent weights, the initial
        mean step size for step sizes (so lr is a fraction of a grid step per Adam step,
        whatever the bit-width); other groups use lr as is."""
        out = []
        for g, ps in self.groups.items():
            if not ps:
                continue
            if g not in lr:
                raise ConfigError(f"compensation.qft.lr.{g} is missing (a learning rate per trained group: {list(GROUPS)})")
            if g in relative:
                out += [{"params": [p], "lr": float(lr[g]) * self.ref[id(p)], "name": g} for p in ps]
            else:
                out.append({"params": ps, "lr": float(lr[g]), "name": g})
        return out

    @torch.no_grad()
    def clamp_scales(self):
        for p in self.groups["w_scale"] + self.groups["a_scale"]:
            p.clamp_(min=SCALE_EPS)

    @torch.no_grad()
    def factors(self) -> dict[str, torch.Tensor]:
        return {p.name: p.t.detach().exp() for p in self.pairs}

    @torch.no_grad()
    def finalize(self, freeze_codes: bool = True) -> None:
        """Fold the preconditioning factors, step sizes back to buffers, codes frozen."""
        # the float path of quantized layers (fp_weight / fp_bias, unparametrized) takes the same
        # factors, so that quantization off is still the original float model
        for pair in self.pairs:
            for mod, tname, dim, offset, inverse in pair.entries:
                if isinstance(mod, _QuantWeighted) and tname in ("weight", "bias"):
                    fp_name = "fp_" + tname
                    fp = getattr(mod, fp_name)
                    setattr(mod, fp_name, _ChannelFactor(pair.t, dim, offset, inverse)(fp))
        for mod, tname in self._parametrized:  # quantized path / float graph: exactly the trained values
            parametrize.remove_parametrizations(mod, tname, leave_parametrized=True)
        self._parametrized = []
        for q in self.quantizers:
            if q.lsq:
                q.set_params(q.scale.detach(), q.zero)
            q.ste = False
        for m in self.layers.values():
            if freeze_codes and m.w_quant is not None:
                m.freeze_weight_codes()
        for p in self.adapter.model.parameters():
            p.requires_grad_(self.requires_grad.get(id(p), True))
            p.grad = None


# ---------------------------------------------------------------------------------------------
# loss


def _forward(adapter, x, target: str, keep_units: bool):
    s, hs = run_chain(adapter, x, keep_units)
    out = adapter.head(s) if target == "output" else adapter.features(s)
    return out, hs


def _distance(q, fp, kind: str, temperature: float):
    if kind == "mse":
        return F.mse_loss(q, fp)
    if kind == "kl":
        T = temperature
        return F.kl_div(F.log_softmax(q / T, -1), F.log_softmax(fp / T, -1), log_target=True, reduction="batchmean") * T * T
    raise ConfigError(f"compensation.qft.loss.distance={kind!r}: use mse or kl")


class Distillation:
    def __init__(self, cfg: dict):
        lc = dict(cfg.get("loss", {}))
        self.target = lc.get("target", "output")
        if self.target not in ("output", "features"):
            raise ConfigError(f"compensation.qft.loss.target={self.target!r}: use output (the task head's output, "
                              "e.g. logits) or features (the adapter's pre-head features)")
        self.distance = lc.get("distance", "mse")
        if self.distance == "kl" and self.target != "output":
            raise ConfigError("compensation.qft.loss.distance=kl needs loss.target=output (logits)")
        self.temperature = float(lc.get("temperature", 1.0))
        self.w_out = float(lc.get("output_weight", 1.0))
        self.w_blocks = float(lc.get("block_weight", 0.0))

    @torch.no_grad()
    def teacher(self, fp_adapter, x):
        return _forward(fp_adapter, x, self.target, self.w_blocks > 0)

    def __call__(self, adapter, x, t_out, t_units):
        out, hs = _forward(adapter, x, self.target, self.w_blocks > 0)
        loss = self.w_out * _distance(out, t_out, self.distance, self.temperature)
        if self.w_blocks > 0:
            loss = loss + self.w_blocks * sum(F.mse_loss(a, b) for a, b in zip(hs, t_units)) / len(hs)
        return loss


# ---------------------------------------------------------------------------------------------
# the method


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
    raise ConfigError(f"compensation.qft.schedule={schedule!r}: use cosine or constant")


def apply(ctx: CompContext, cfg: dict) -> dict:
    """Finetune every degree of freedom of ``ctx.adapter.model`` (in place), fold, freeze."""
    t0 = time.time()
    adapter, fp = ctx.adapter, ctx.fp_adapter
    batches = ctx.calib(int(cfg["num_samples"]), cfg["calib_transform"], int(cfg["batch_size"]), shard=True)
    xs = batch_cat(batches)
    n_xs = batch_len(xs)
    bs, epochs = int(cfg["batch_size"]), int(cfg["epochs"])
    loss_fn = Distillation(cfg)
    set_quant_state(adapter.model, True, True)
    adapter.model.eval()
    fp.model.eval()
    trainer = QFT(adapter, cfg.get("train"), cfg.get("precond_sites", SITES))
    # teacher outputs once (the calibration images are fixed); always when the teacher is the float
    # path of the model being trained (runtime.memory=lean): training changes what that path computes
    cache = loss_fn.w_blocks == 0 or fp.model is adapter.model
    t_cache = None
    if cache:
        parts = [loss_fn.teacher(fp, batch_take(xs, torch.arange(i, min(i + bs, n_xs)))) for i in range(0, n_xs, bs)]
        t_cache = (torch.cat([p[0] for p in parts]),
                   [torch.cat([p[1][u] for p in parts]) for u in range(len(parts[0][1]))] if loss_fn.w_blocks > 0 else None)

    def targets(idx):
        if cache:
            out = t_cache[0][idx.to(t_cache[0].device)]
            return out, None if t_cache[1] is None else [h[idx.to(h.device)] for h in t_cache[1]]
        return loss_fn.teacher(fp, batch_take(xs, idx))

    @torch.no_grad()
    def full_loss():
        tot = 0.0
        for i in range(0, n_xs, bs):
            idx = torch.arange(i, min(i + bs, n_xs))
            tot += float(loss_fn(adapter, batch_take(xs, idx), *targets(idx))) * len(idx)
        return tot / n_xs

    eval_loss = bool(cfg.get("eval_loss", True))
    loss_before = full_loss() if eval_loss else None
    groups = trainer.param_groups(dict(cfg["lr"]), RELATIVE if cfg.get("lr_relative", True) else ())
    base_lr = [g["lr"] for g in groups]
    betas = tuple(float(b) for b in cfg.get("betas", (0.9, 0.999)))
    opt = torch.optim.Adam(groups, betas=betas, weight_decay=float(cfg.get("weight_decay", 0.0)))
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    # every rank takes the same number of steps (shards differ by at most one image: pad by repeats)
    n_rank = math.ceil(int(cfg["num_samples"]) / dist.world()) if dist.world() > 1 else n_xs
    steps_per_epoch = math.ceil(n_rank / bs)
    total = epochs * steps_per_epoch
    params = [p for g in groups for p in g["params"]]
    clip = cfg.get("grad_clip")
    losses, step = [], 0
    for ep in range(epochs):
        perm = torch.randperm(n_xs, generator=gen)
        perm = torch.cat([perm, perm[: n_rank - len(perm)]])
        for i in range(0, n_rank, bs):
            idx = perm[i : i + bs]
            for g, lr in zip(opt.param_groups, base_lr):
                g["lr"] = lr * _lr_factor(cfg.get("schedule", "cosine"), step, total)
            loss = loss_fn(adapter, batch_take(xs, idx), *targets(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if dist.world() > 1:
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce_sum(p.grad)
                        p.grad /= dist.world()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            opt.step()
            trainer.clamp_scales()
            losses.append(float(loss.detach()))
            step += 1
        ctx.log(f"[qft] epoch {ep + 1}/{epochs}: loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.5f}")
    loss_after = full_loss() if eval_loss else None
    if cfg.get("_on_trained") is not None:  # tests: the trained model before folding / freezing
        cfg["_on_trained"](adapter, trainer)
    factors = trainer.factors()
    trainer.finalize(freeze_codes=bool(cfg.get("freeze_codes", True)))
    fs = torch.cat([f.flatten() for f in factors.values()]) if factors else torch.ones(1)
    return {
        "steps": len(losses), "epochs": epochs, "num_samples": n_xs,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "loss_before": loss_before, "loss_after": loss_after,
        "trainable": trainer.counts(),
        "precond_sites": {s: sum(p.site == s for p in trainer.pairs) for s in SITES},
        "precond_factor_range": [float(fs.min()), float(fs.max())],
        "time_s": round(time.time() - t0, 3),
    }


# ---------------------------------------------------------------------------------------------
# deployment form


def _int_dtype(bits: int):
    return torch.int8 if bits <= 7 else torch.int16 if bits <= 15 else torch.int32


@torch.no_grad()
def export(model: nn.Module) -> dict:
    """The deployment form of a (finalized) quantized model:
    weights:     {layer: {codes (integer tensor), scale, zero, bits, bias, [out_gamma, out_beta]}}
                 dequantized weight = (codes - zero) * scale (group granularity: per group view)
    activations: {quantizer: {scale, zero, bits, scheme}}
    float:       every other tensor of the model (LayerNorm / BatchNorm with the preconditioning
                 folded in, embeddings, QwT branches, ...)."""
    weights, acts, owned = {}, {}, set()
    for name, m in model.named_modules():
        if isinstance(m, _QuantWeighted):
            owned.add(name)
            entry = {"bias": None if m.bias is None else m.bias.detach().clone()}
            if m.w_quant is not None:
                q = m.w_quant
                codes = m.w_codes
                if codes is None:
                    codes = quantize_codes(m._grouped(m.weight.detach()), q.scale, q.zero, q.spec.qmin, q.spec.qmax).reshape(m.weight.shape)
                entry.update(codes=codes.round().to(_int_dtype(q.spec.bits)), scale=q.scale.detach().clone(),
                             zero=q.zero.detach().clone(), bits=q.spec.bits)
            else:
                entry["weight"] = m.weight.detach().clone()
            if m.out_gamma is not None:
                entry.update(out_gamma=m.out_gamma.detach().clone(), out_beta=m.out_beta.detach().clone())
            weights[name] = entry
        elif isinstance(m, Quantizer):
            owned.add(name)
            if m.calibrated:
                acts[name] = {"scale": m.scale.detach().clone(), "zero": m.zero.detach().clone(),
                              "bits": m.spec.bits, "scheme": m.spec.scheme}
    float_ = {}
    for k, v in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if any(owner == o or owner.startswith(o + ".") for o in owned):
            continue
        float_[k] = v.detach().clone()
    return {"weights": weights, "activations": acts, "float": float_}


@torch.no_grad()
def load_export(model: nn.Module, exported: dict) -> nn.Module:
    """Write an ``export`` into ``model`` (same architecture, already patched): the model then
    computes, quantized, exactly what the exported one did."""
    for name, e in exported["weights"].items():
        m = model.get_submodule(name)
        if "codes" in e:
            m.w_quant.set_params(e["scale"], e["zero"])
            m.w_codes = e["codes"].to(m.weight.dtype)
            m.weight.data.copy_(m.quant_weight())
        else:
            m.weight.data.copy_(e["weight"])
        if e["bias"] is None:
            m.bias = None
        elif m.bias is None:
            m.bias = nn.Parameter(e["bias"].clone())
        else:
            m.bias.data.copy_(e["bias"])
        if "out_gamma" in e:
            m.out_gamma, m.out_beta = nn.Parameter(e["out_gamma"].clone()), nn.Parameter(e["out_beta"].clone())
    for name, e in exported["activations"].items():
        model.get_submodule(name).set_params(e["scale"], e["zero"])
    missing = set(exported["float"]) - set(model.state_dict())
    if missing:
        raise ValueError(f"load_export: the model has no tensors {sorted(missing)[:5]}: not the exported architecture")
    model.load_state_dict(exported["float"], strict=False)
    return model
