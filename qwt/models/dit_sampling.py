"""The project's DiT sampler around diffusers' schedulers (DDIM by default), with the original
DiT's classifier-free guidance convention.

Guidance (``guidance_channels``): the model runs on [x, x] with labels [y, null]; of the
prediction's first C channels (the noise; learned-sigma channels follow and are dropped) the first
``guidance_channels`` are guided, eps = uncond + s (cond - uncond), and the others keep the
conditional prediction. The original DiT guides the first 3 of the 4 latent channels
(``forward_with_cfg``: ``eps, rest = model_out[:, :3], model_out[:, 3:]``), so the real model's
default is 3. ``None`` guides every channel: diffusers' ``DiTPipeline`` does that, and it is what
the embedded pixel-space model (one grey channel) uses -- 3 of 1 channel would be all of it anyway.
The scheduler steps only the conditional half (with eta = 0 DDIM both halves are identical).

DDIM: 1000 training steps, linear betas 1e-4..0.02 (DiT's), ``timestep_spacing`` "leading" gives
t = 980, 960, ..., 0 at 50 steps (the original's ``space_timesteps(1000, "ddim50")`` visits the same
timesteps); ``clip_sample`` off for latents (the original samples with clip_denoised=False), on for
the pixel-space model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class SamplerConfig:
    num_steps: int = 50
    guidance_scale: float = 1.5
    guidance_channels: int | None = 3
    scheduler: str = "ddim"
    timestep_spacing: str = "leading"
    clip_sample: bool = False
    eta: float = 0.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplerConfig":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            from ..errors import ConfigError

            raise ConfigError(f"unknown sampler option(s) {sorted(bad)}: the options are {sorted(known)}")
        return cls(**d)


def make_scheduler(cfg: SamplerConfig):
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  clip_sample=cfg.clip_sample, timestep_spacing=cfg.timestep_spacing, prediction_type="epsilon")
    if cfg.scheduler == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)
    if cfg.scheduler == "ddpm":
        return DDPMScheduler(variance_type="fixed_small", **common)
    from ..errors import ConfigError

    raise ConfigError(f"generation.sampler.scheduler={cfg.scheduler!r}: use ddim or ddpm")


def guided_eps(out: torch.Tensor, channels: int, scale: float, guidance_channels: int | None) -> torch.Tensor:
    """The guided noise prediction for the conditional half of a [cond; uncond] model output
    (see the module docstring)."""
    eps = out[:, :channels]
    cond, uncond = eps.chunk(2)
    g = channels if guidance_channels is None else min(int(guidance_channels), channels)
    mixed = cond.clone()
    mixed[:, :g] = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    return mixed


class Sampler:
    """``sample(model_fn, noise, labels)``: model_fn(x, t, y) -> prediction (B, C_out, H, W)."""

    def __init__(self, cfg: SamplerConfig, null_label: int):
        self.cfg, self.null_label = cfg, int(null_label)

    @torch.no_grad()
    def sample(self, model_fn: Callable, noise: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
               trajectory: Callable | None = None) -> torch.Tensor:
        """Denoise ``noise`` (B, C, H, W) into samples in the model's space. ``trajectory``, if
        given, is called as trajectory(step index, t, x_t) before each step (calibration points)."""
        cfg = self.cfg
        sched = make_scheduler(cfg)
        sched.set_timesteps(int(cfg.num_steps))
        x = noise
        C = x.shape[1]
        guided = cfg.guidance_scale != 1.0
        y_in = torch.cat([labels, torch.full_like(labels, self.null_label)]) if guided else labels
        for i, t in enumerate(sched.timesteps):
            if trajectory is not None:
                trajectory(i, int(t), x)
            x_in = torch.cat([x, x]) if guided else x
            tt = torch.full((x_in.shape[0],), int(t), device=x.device, dtype=torch.long)
            out = model_fn(x_in, tt, y_in)
            eps = guided_eps(out, C, cfg.guidance_scale, cfg.guidance_channels) if guided else out[:, :C]
            kw = {"eta": cfg.eta, "generator": generator} if cfg.scheduler == "ddim" else {"generator": generator}
            x = sched.step(eps, t, x, **kw).prev_sample
        return x
