"""DiT (diffusers ``DiTTransformer2DModel``, 0.42.x): the block adapter, the model wrapper that
carries the transformer, the VAE (latent models) and the sampling settings, and the builders of the
real ``facebook/DiT-XL-2-256`` and of the embedded pixel-space DiT.

A batch is ``(x_t, t, y)``: noisy latents / pixels (B, C, H, W), timesteps (B,) (or a scalar) and
class labels (B,) (the null label ``num_classes`` is the unconditional branch of classifier-free
guidance). The model's output is the transformer's prediction (B, C_out, H, W) (noise, plus the
learned-sigma channels when ``out_channels = 2 C``).

Block view:
  stem   patch embedding + positional embedding; the conditioning (timestep, class label) is the
         keyword state every block is called with (each diffusers block embeds it itself with its
         own ``norm1.emb``, a copy of the original DiT's shared embedders)
  units  ``transformer_blocks.i``, called as block(hidden_states, timestep=t, class_labels=y)
  head   final adaLN (conditioning from block 0's embedder, as diffusers' forward), projection,
         unpatchify
Roles (Q-DiT's W4A8): in every block the attention q/k/v, the attention output, fc1 (``ff.net.0.proj``)
and fc2 (``ff.net.2``) get quantized weights and input quantizers; the adaLN modulation Linear
(``norm1.linear``) is weight-only; the embedders (``norm1.emb.*``), the patch embedding, the final
layer (``proj_out_1``/``proj_out_2``) and the attention matmuls stay float. The VAE is never touched.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import AdaptedModel, ModelAdapter, State, Unit

REAL_DIT = "facebook/DiT-XL-2-256"


class DiTGenerator(AdaptedModel):
    """The transformer plus what generation needs around it (the VAE of latent models, the latent
    scale, the class count). ``forward(x_t, t, y)`` is the transformer's prediction."""

    adapter_class = "qwt.models.dit:DiTAdapter"

    def __init__(self, transformer: nn.Module, vae: nn.Module | None = None, scaling_factor: float = 1.0,
                 num_classes: int | None = None):
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False).eval()
        self.scaling_factor = float(scaling_factor)
        self.num_classes = int(num_classes if num_classes is not None else transformer.config.num_embeds_ada_norm)

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def sample_size(self) -> int:
        return int(self.transformer.config.sample_size)

    def forward(self, x, t, y):
        return self.make_adapter().forward((x, t, y))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the transformer's input space (latents x scale, or the pixels)."""
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.sample() * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The transformer's space -> images in [-1, 1] (not clamped)."""
        if self.vae is None:
            return z
        return self.vae.decode(z / self.scaling_factor).sample


class DiTAdapter(ModelAdapter):
    """Adapter of a ``DiTGenerator`` (or of a bare ``DiTTransformer2DModel``)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.prefix = "transformer." if isinstance(model, DiTGenerator) else ""

    @property
    def dit(self) -> nn.Module:
        return self.model.transformer if self.prefix else self.model

    def _blocks(self) -> str:
        return f"{self.prefix}transformer_blocks"

    # -- block view ---------------------------------------------------------------------------
    def stem(self, batch) -> State:
        x, t, y = batch
        d = self.dit
        p = d.config.patch_size
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t[None]
        t = t.expand(x.shape[0])
        y = torch.as_tensor(y, device=x.device).reshape(-1).expand(x.shape[0])
        h = d.pos_embed(x)
        return State(h, {"timestep": t, "class_labels": y}, {"hw": (x.shape[-2] // p, x.shape[-1] // p)})

    def units(self) -> list[Unit]:
        return [Unit(f"{self._blocks()}.{i}") for i in range(len(self.dit.transformer_blocks))]

    def head(self, state: State):
        d = self.dit
        h = state.h
        t, y = state.kwargs["timestep"], state.kwargs["class_labels"]
        cond = self.get(f"{self._blocks()}.0.norm1.emb")(t, y, hidden_dtype=h.dtype)
        shift, scale = d.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        h = d.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        h = d.proj_out_2(h)
        p, c = d.config.patch_size, d.out_channels
        hh, ww = state.extras["hw"]
        h = h.reshape(-1, hh, ww, p, p, c)
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(-1, c, hh * p, ww * p)

    # -- roles --------------------------------------------------------------------------------
    def quantizable(self, name: str, module: nn.Module) -> bool:
        return (name.startswith(self._blocks() + ".") and isinstance(module, nn.Linear)
                and ".norm1.emb." not in name)

    def float_layers(self) -> set[str]:
        """Embedders, patch embedding and final layer (stay float; ``quantizable`` skips them)."""
        out = set()
        for name, m in self.model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and (".norm1.emb." in name or not name.startswith(self._blocks() + ".")):
                out.add(name)
        return out

    def weight_only_layers(self) -> set[str]:
        return {f"{self._blocks()}.{i}.norm1.linear" for i in range(len(self.dit.transformer_blocks))}

    def clone(self, memo=None):
        import copy

        return type(self)(copy.deepcopy(self.model, memo))


def set_original_dit_numerics(transformer: nn.Module) -> nn.Module:
    """Make a converted diffusers DiT compute as the original DiT code (bit-exact per
    METHODS.md): the timestep embedding divides by 128 (``downscale_freq_shift = 0``; diffusers:
    127) and every block LayerNorm has eps 1e-6 (diffusers' ``norm_eps`` default: 1e-5)."""
    for blk in transformer.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
        for m in blk.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-6
    return transformer


# ---------------------------------------------------------------------------------------------
# builders (``model.source``; registered in ``qwt.models.zoo.SOURCES``)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def build_real_dit(model_cfg: dict, log=print) -> DiTGenerator:
    """``facebook/DiT-XL-2-256`` (transformer + VAE) from a local folder (``model.checkpoint``: a
    diffusers pipeline folder with ``transformer/`` and ``vae/``) or the Hugging Face cache."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    repo = model_cfg.get("checkpoint") or model_cfg.get("hub_id") or REAL_DIT
    local = os.path.isdir(str(repo))
    if model_cfg.get("checkpoint") and not local:
        raise ConfigError(f"model.checkpoint={repo} is not a folder: give a diffusers DiT pipeline folder "
                          f"(with transformer/ and vae/, e.g. a snapshot of {REAL_DIT})")
    vae_src = model_cfg.get("vae") or repo
    try:
        tr = DiTTransformer2DModel.from_pretrained(str(repo), subfolder="transformer", local_files_only=True)
        if os.path.isdir(str(vae_src)) and os.path.isdir(os.path.join(str(vae_src), "vae")):
            vae = AutoencoderKL.from_pretrained(str(vae_src), subfolder="vae", local_files_only=True)
        elif vae_src == repo:
            vae = AutoencoderKL.from_pretrained(str(vae_src), subfolder="vae", local_files_only=True)
        else:
            vae = AutoencoderKL.from_pretrained(str(vae_src), local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(
            f"could not load the DiT model {repo} (VAE {vae_src}) from local files ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
            f"Download it elsewhere (huggingface-cli download {REAL_DIT}; VAE stabilityai/sd-vae-ft-mse) and set "
            "model.checkpoint=/path/to/DiT-XL-2-256 (a folder with transformer/ and vae/) and optionally model.vae=/path/to/sd-vae-ft-mse, "
            "or put them in the Hugging Face cache") from e
    if model_cfg.get("original_numerics", True):
        set_original_dit_numerics(tr)
    return DiTGenerator(tr, vae, scaling_factor=float(model_cfg.get("scaling_factor", 0.18215)),
                        num_classes=int(model_cfg.get("num_classes", 1000)))


def embedded_transformer(model_cfg: dict) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**dict(model_cfg["kwargs"]))


def build_embedded_dit(model_cfg: dict, log=print) -> DiTGenerator:
    """The embedded pixel-space DiT from its shipped weights (``tools/train_embedded.py``)."""
    from .shipped import load_shipped

    state, _ = load_shipped(model_cfg["name"])
    tr = embedded_transformer(model_cfg)
    tr.load_state_dict(state)
    return DiTGenerator(tr.eval(), None, 1.0, num_classes=int(model_cfg["kwargs"]["num_embeds_ada_norm"]))


# ---------------------------------------------------------------------------------------------
# training the embedded DiT (``python tools/train_embedded.py dit_embedded``)


def embedded_images(data_cfg: dict, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """digits-in-the-wild images at the DiT's size: (uint8 (n, C, S, S), labels)."""
    from ..data import digits_wild

    spec = digits_wild.WildSpec(size=int(data_cfg["size"]), glyph_px=tuple(data_cfg["glyph_px"]))
    return digits_wild.load(split, int(n), spec, seed=int(data_cfg.get("seed", 0)), cache_dir=data_cfg.get("cache_dir"))


def train_embedded_dit(cfg: dict, log=print) -> tuple[dict, dict]:
    """DDPM training (epsilon prediction, linear betas 1e-4..0.02 over 1000 steps, as DiT) with
    label dropout (the null class) for classifier-free guidance; returns the EMA weights."""
    from ..data.digits_wild import to_float

    tc = cfg["train"]
    torch.manual_seed(int(tc["seed"]))
    model = embedded_transformer(cfg)
    ema = embedded_transformer(cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    x_all, y_all = embedded_images(cfg["data"], "train", int(tc["train_images"]))
    x_all = to_float(x_all)
    T = 1000
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    n_cls = int(cfg["kwargs"]["num_embeds_ada_norm"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(tc["lr"]), weight_decay=float(tc.get("weight_decay", 0.0)))
    steps, bs = int(tc["steps"]), int(tc["batch_size"])
    warm = int(tc.get("warmup", 100))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    g = torch.Generator().manual_seed(int(tc["seed"]))
    decay = float(tc.get("ema", 0.995))
    t0, losses = time.time(), []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (bs,), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        drop = torch.rand(bs, generator=g) < float(tc.get("label_dropout", 0.0))  # diffusers drops 10% itself in train mode
        y[drop] = n_cls
        t = torch.randint(0, T, (bs,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = model(xt, t, y).sample
        loss = F.mse_loss(out[:, : x0.shape[1]], eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        losses.append(loss.item())
        if (step + 1) % 200 == 0:
            log(f"step {step + 1}/{steps} loss {sum(losses[-200:]) / 200:.4f} ({time.time() - t0:.0f}s)")
    return ema.state_dict(), {"final_loss_200": round(sum(losses[-200:]) / min(200, len(losses)), 5), "steps": steps}
