"""Class-conditional image generation (DiT): calibration data, sampling and FID / IS / precision-recall.

Model: a ``DiTGenerator`` (``qwt/models/dit.py``): the real ``facebook/DiT-XL-2-256`` with its VAE
(``model=dit_xl_2``) or the embedded pixel-space DiT (``model=dit_embedded``).

Calibration (``calibration(n, transform, batch_size)``), batches of (x_t, t, y):
  sampling     Q-DiT's stage-1 set: the FP model's own DDIM trajectories (random labels, the run's
               sampler with guidance) cut at a random step per trajectory; with guidance both the
               conditional and the null-label input of that step are points (n/2 trajectories);
  train/eval   QwT's set: real training images (ImageNet train: center crop to the model's
               resolution, random flip for ``train`` when ``generation.calib_flip``, [-1, 1],
               VAE-encoded x 0.18215; embedded: digits in the wild), their real labels, noised at
               ``generation.calib_t``: an int (default 0: the reference), a list (point i gets
               entry i mod len), or "sampled" (uniform over the 1000 training steps).
Sampling: ``generation.num_samples`` images per sampling seed, random labels, the project's
sampler (``qwt/models/dit_sampling.py``). Per sample i the noise and label come from a generator
seeded by (seed, chunk), so samples do not depend on batch size, sharding or resumption. Samples are
saved per row in chunks (``generation.samples_dir``/<row key>/seed<k>/chunk_<i>.pt, uint8); an
interrupted run resumes from the chunks on disk; under torchrun chunk i is drawn by rank i mod world
(a shared samples_dir is required) and rank 0 computes the metrics.
Metrics: torch-fidelity, offline, against ``generation.reference``: ``embedded`` (digits in the wild
eval images), an image folder, or an ADM ``.npz`` (its ``arr_0`` images). The feature extractor is
``inception-v3-compat`` with ``generation.feature_extractor_weights_path`` (a local copy of
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``) for the real model, or the shipped
embedded CNN (``embedded_fid_cnn``). FID and IS are averaged over ``generation.sample_seeds``; their
spread (std over seeds) is recorded. sFID (spatial Inception features) is not computed by
torch-fidelity and is not reported.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from .. import dist
from ..errors import ConfigError
from .base import Task

METRIC_KEYS = {"fid": "frechet_inception_distance", "isc": "inception_score_mean", "precision": "precision", "recall": "recall"}
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".JPEG", ".webp", ".bmp")

DEFAULTS = {
    "num_samples": 1000, "sample_seeds": [0], "batch_size": 250, "chunk_size": 250,
    "sampler": {}, "calib_t": 0, "calib_flip": True, "feature_extractor": "inception-v3-compat",
    "feature_extractor_weights_path": None, "reference": None, "reference_count": 5000, "metrics": ["fid", "isc"],
    "samples_dir": "results/samples", "save_samples": True, "calib_batch_size": 64, "image_size": 256,
}


def _abar() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class _Uint8Images(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) -> torch-fidelity's input (3 channels for Inception)."""

    def __init__(self, images: torch.Tensor, rgb: bool):
        self.images, self.rgb = images, rgb

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if self.rgb and x.shape[0] == 1 else x


class GenerationTask(Task):
    name = "generation"
    headline = "fid"
    higher_is_better = False
    table_columns = (("fid", "FID", "{:.2f}"), ("fid_std", "FID sd", "{:.2f}"), ("isc", "IS", "{:.3f}"),
                     ("precision", "prec", "{:.3f}"), ("recall", "recall", "{:.3f}"))

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        g = dict(DEFAULTS)
        g.update(cfg.get("generation") or {})
        bad = set(g) - set(DEFAULTS)
        if bad:
            raise ConfigError(f"unknown generation option(s) {sorted(bad)}: the options are {sorted(DEFAULTS)}")
        self.g = g
        from ..models.dit_sampling import SamplerConfig

        self.sampler_cfg = SamplerConfig.from_dict(g["sampler"])
        self.embedded = cfg["data"]["name"] == "digits_wild"
        self.model = None
        self._calib_cache: dict = {}
        self._check()

    # -- fail early ---------------------------------------------------------------------------
    def _check(self):
        g, data = self.g, self.cfg["data"]
        if not isinstance(g["sample_seeds"], (list, tuple)) or not g["sample_seeds"]:
            raise ConfigError(f"generation.sample_seeds={g['sample_seeds']!r} must be a non-empty list, e.g. [0, 1, 2]")
        if int(g["num_samples"]) < 2:
            raise ConfigError("generation.num_samples must be >= 2 (FID needs a covariance)")
        ct = g["calib_t"]
        if not (isinstance(ct, int) and 0 <= ct < 1000 or ct == "sampled" or
                isinstance(ct, (list, tuple)) and ct and all(isinstance(v, int) and 0 <= v < 1000 for v in ct)):
            raise ConfigError(f"generation.calib_t={ct!r}: an int timestep in 0..999 (the reference: 0), a list of them, or 'sampled'")
        if dist.world() > 1 and not g["save_samples"]:
            raise ConfigError("sampling sharded over ranks needs generation.save_samples=true (the ranks exchange chunks through a shared samples_dir)")
        if self.embedded:
            if g["feature_extractor"] not in ("embedded_fid_cnn",):
                raise ConfigError(f"generation.feature_extractor={g['feature_extractor']!r}: the embedded model is scored with embedded_fid_cnn")
            if g["reference"] not in (None, "embedded"):
                raise ConfigError("the embedded model's reference set is generation.reference=embedded (digits in the wild eval images)")
            return
        if data["name"] != "imagenet":
            raise ConfigError(f"data={data['name']}: generation uses data=digits_wild (embedded) or data=imagenet (the real DiT)")
        if g["feature_extractor"] == "inception-v3-compat":
            w = g["feature_extractor_weights_path"]
            if not w or not os.path.isfile(str(w)):
                raise ConfigError(f"generation.feature_extractor_weights_path={w!r}: torch-fidelity runs offline here and needs its Inception "
                                  "weights as a local file: download weights-inception-2015-12-05-6726825d.pth (torch-fidelity's release "
                                  "assets) elsewhere and set generation.feature_extractor_weights_path=/path/to/it")
        ref = g["reference"]
        if not ref or not (os.path.isdir(str(ref)) or (str(ref).endswith(".npz") and os.path.isfile(str(ref)))):
            raise ConfigError(f"generation.reference={ref!r}: give an image folder or the ADM reference batch "
                              "(VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion's evaluations) as a local path")
        from .classification import check_imagenet_root

        root = data.get("root")
        if root is None or not os.path.isdir(os.path.join(str(root), "train")):
            check_imagenet_root(root)

    # -- model --------------------------------------------------------------------------------
    def build_model(self):
        model = super().build_model()
        from ..models.dit import DiTGenerator

        if not isinstance(model, DiTGenerator):
            raise ConfigError(f"task=generation needs a DiT model (model=dit_embedded or dit_xl_2), got {type(model).__name__}")
        self.model = model
        self._digest = self.weights_digest(model)  # part of the samples' folder key (retrained weights: new samples)
        return model

    # -- calibration --------------------------------------------------------------------------
    def num_calibration_samples(self):
        return None

    def calibration(self, n, transform, batch_size, shard=False):
        key = (int(n), transform, int(batch_size))
        if key not in self._calib_cache:
            if transform == "sampling":
                x, t, y = self._trajectory_points(int(n))
            elif transform in ("train", "eval"):
                x, t, y = self._real_points(int(n), flip=transform == "train" and bool(self.g["calib_flip"]))
            else:
                raise ConfigError(f"calib_transform={transform!r}: generation offers sampling (DDIM trajectories), train or eval (real images)")
            self._calib_cache[key] = (x.cpu(), t.cpu(), y.cpu())
        x, t, y = self._calib_cache[key]
        idx = list(range(len(y)))
        if shard:
            idx = dist.shard(idx)
        idx = torch.tensor(idx, dtype=torch.long)
        out = []
        for s in range(0, len(idx), int(batch_size)):
            j = idx[s:s + int(batch_size)]
            out.append((x[j].to(self.device), t[j].to(self.device), y[j].to(self.device)))
        return out

    def _model_fn(self, adapter):
        def fn(x, t, y):
            return adapter.forward((x, t, y))

        return fn

    @torch.no_grad()
    def _trajectory_points(self, n: int):
        from ..models.base import adapter_for
        from ..models.dit_sampling import Sampler
        from ..quant.modules import float_view

        model = self.model
        sc = self.sampler_cfg
        guided = sc.guidance_scale != 1.0
        m = math.ceil(n / 2) if guided else n
        g = torch.Generator().manual_seed(10_000 + self.seed)
        labels = torch.randint(0, model.num_classes, (m,), generator=g)
        steps = torch.randint(0, int(sc.num_steps), (m,), generator=g)
        shape = (model.in_channels, model.sample_size, model.sample_size)
        noise = torch.randn((m,) + shape, generator=g)
        xs = torch.zeros((m,) + shape)
        ts = torch.zeros(m, dtype=torch.long)
        adapter = adapter_for(model)
        sampler = Sampler(sc, model.num_classes)
        bs = int(self.g["batch_size"])
        with float_view(model):
            for s in range(0, m, bs):
                sl = slice(s, min(m, s + bs))

                def keep(i, t, x, sl=sl):
                    hit = steps[sl] == i
                    xs[sl][hit] = x[hit.to(x.device)].float().cpu()
                    ts[sl][hit] = t

                sampler.sample(self._model_fn(adapter), noise[sl].to(self.device), labels[sl].to(self.device), trajectory=keep)
        if guided:
            xs, ts = torch.cat([xs, xs]), torch.cat([ts, ts])
            labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        return xs[:n], ts[:n], labels[:n]

    def _calib_timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        ct = self.g["calib_t"]
        if ct == "sampled":
            return torch.randint(0, 1000, (n,), generator=g)
        if isinstance(ct, (list, tuple)):
            return torch.tensor([int(ct[i % len(ct)]) for i in range(n)], dtype=torch.long)
        return torch.full((n,), int(ct), dtype=torch.long)

    @torch.no_grad()
    def _real_points(self, n: int, flip: bool):
        g = torch.Generator().manual_seed(20_000 + self.seed)
        if self.embedded:
            from ..data.digits_wild import to_float
            from ..models.dit import embedded_images

            imgs, labels = embedded_images(self.cfg["model"]["data"], "train", 20000)
            idx = torch.randperm(len(labels), generator=g)[:n]
            x0, y = to_float(imgs[idx]), labels[idx]
            if flip:
                f = torch.rand(n, generator=g) < 0.5
                x0[f] = x0[f].flip(-1)
        else:
            x0, y = self._imagenet_images(n, flip, g)
            z = []
            for s in range(0, n, int(self.g["calib_batch_size"])):
                z.append(self.model.encode(x0[s:s + int(self.g["calib_batch_size"])].to(self.device)).cpu())
            x0 = torch.cat(z)
        t = self._calib_timesteps(n, g)
        a = _abar()[t].view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y

    def _imagenet_images(self, n: int, flip: bool, g: torch.Generator):
        """n ImageNet train images (fixed by the seed): ADM's center crop to image_size, flip, [-1, 1]."""
        import numpy as np
        from PIL import Image

        root = Path(str(self.cfg["data"]["root"])) / "train"
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        files = []
        for ci, c in enumerate(classes):
            for f in sorted(os.listdir(root / c)):
                if f.endswith(IMAGE_EXT):
                    files.append((root / c / f, ci))
        if n > len(files):
            raise ConfigError(f"asked for {n} calibration images but {root} holds {len(files)}")
        idx = torch.randperm(len(files), generator=g)[:n].tolist()
        size = int(self.g["image_size"])
        xs, ys = [], []
        for i in idx:
            path, ci = files[i]
            img = Image.open(path).convert("RGB")
            while min(*img.size) >= 2 * size:  # ADM / DiT center_crop_arr
                img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
            scale = size / min(*img.size)
            img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
            arr = np.array(img)
            cy, cx = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
            arr = arr[cy:cy + size, cx:cx + size]
            x = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
            if flip and float(torch.rand(1, generator=g)) < 0.5:
                x = x.flip(-1)
            xs.append(x)
            ys.append(ci)
        return torch.stack(xs), torch.tensor(ys)

    # -- sampling -----------------------------------------------------------------------------
    def _row_dir(self, desc: str, seed: int) -> Path:
        c = self.cfg
        what = {"model": c["model"], "weights": getattr(self, "_digest", None), "generation": {k: self.g[k] for k in ("num_samples", "sampler", "chunk_size")},
                "data": c["data"]["name"]}
        variant = desc.replace("eval ", "")
        if variant != "fp":
            what.update(ptq=c["ptq"], bits=c["bits"], compensation=c["compensation"], numerics=c.get("numerics"),
                        seed=c.get("seed"), calib={k: self.g[k] for k in ("calib_t", "calib_flip")})
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return Path(str(self.g["samples_dir"])) / f"{c.get('exp_name', 'default')}-{digest}" / variant / f"seed{seed}"

    @torch.no_grad()
    def sample(self, adapter, seed: int, desc: str = "sample") -> torch.Tensor:
        """generation.num_samples uint8 images (N, C, H, W) for sampling seed ``seed`` (resumable)."""
        from ..models.dit_sampling import Sampler

        model = adapter.model
        N, chunk = int(self.g["num_samples"]), int(self.g["chunk_size"])
        n_chunks = math.ceil(N / chunk)
        save = bool(self.g["save_samples"])
        d = self._row_dir(desc, seed)
        if save:
            d.mkdir(parents=True, exist_ok=True)
        sampler = Sampler(self.sampler_cfg, model.num_classes)
        fn = self._model_fn(adapter)
        shape = (model.in_channels, model.sample_size, model.sample_size)
        mem: dict[int, torch.Tensor] = {}
        bs = int(self.g["batch_size"])
        done_before = 0
        for ci in range(n_chunks):
            if ci % dist.world() != dist.rank():
                continue
            path = d / f"chunk_{ci:05d}.pt"
            if save and path.is_file():
                done_before += 1
                continue
            k = min(chunk, N - ci * chunk)
            g = torch.Generator().manual_seed(1_000_003 * (int(seed) + 1) + ci)
            labels = torch.randint(0, model.num_classes, (k,), generator=g)
            noise = torch.randn((k,) + shape, generator=g)
            outs = []
            for s in range(0, k, bs):
                z = sampler.sample(fn, noise[s:s + bs].to(self.device), labels[s:s + bs].to(self.device))
                img = model.decode(z).float().clamp(-1, 1)
                outs.append(torch.round((img + 1) * 127.5).to(torch.uint8).cpu())
            imgs = torch.cat(outs)
            if save:
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save({"images": imgs, "labels": labels}, tmp)
                os.replace(tmp, path)
            else:
                mem[ci] = imgs
        if done_before:
            self.log(f"[qwt] {desc} seed {seed}: resumed, {done_before} chunks already in {d}")
        dist.barrier()
        parts = []
        for ci in range(n_chunks):
            parts.append(mem[ci] if ci in mem else torch.load(d / f"chunk_{ci:05d}.pt", weights_only=True)["images"])
        return torch.cat(parts)

    # -- metrics ------------------------------------------------------------------------------
    def _reference(self):
        g = self.g
        if self.embedded:
            if not hasattr(self, "_ref_images"):
                from ..models.dit import embedded_images

                self._ref_images, _ = embedded_images(self.cfg["model"]["data"], "eval", int(g["reference_count"]))
            return _Uint8Images(self._ref_images, rgb=False)
        ref = str(g["reference"])
        if ref.endswith(".npz"):
            if not hasattr(self, "_ref_images"):
                import numpy as np

                arr = np.load(ref)["arr_0"]  # (N, H, W, 3) uint8
                self._ref_images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
            return _Uint8Images(self._ref_images, rgb=True)
        return ref  # an image folder: torch-fidelity reads it

    def metrics_of(self, images: torch.Tensor) -> dict:
        import torch_fidelity

        g = self.g
        kw = {}
        if self.embedded:
            from ..models.fid_cnn import register

            kw["feature_extractor"] = register()
        else:
            kw["feature_extractor"] = g["feature_extractor"]
            if g["feature_extractor_weights_path"]:
                kw["feature_extractor_weights_path"] = str(g["feature_extractor_weights_path"])
        wanted = set(g["metrics"])
        bad = wanted - {"fid", "isc", "prc"}
        if bad:
            raise ConfigError(f"generation.metrics has {sorted(bad)}: use fid, isc, prc (sFID is not available in torch-fidelity)")
        res = torch_fidelity.calculate_metrics(
            input1=_Uint8Images(images, rgb=not self.embedded), input2=self._reference(),
            cuda=self.device.type == "cuda", fid="fid" in wanted, isc="isc" in wanted, prc="prc" in wanted,
            verbose=False, cache=False, save_cpu_ram=True, batch_size=250, samples_find_deep=True, **kw)
        out = {}
        for k, v in METRIC_KEYS.items():
            if v in res:
                out[k] = float(res[v])
        return out

    def evaluate(self, adapter, reference=None, desc="eval"):
        per_seed, times = [], []
        for seed in self.g["sample_seeds"]:
            t0 = time.time()
            imgs = self.sample(adapter, int(seed), desc)
            t_sample = time.time() - t0
            m = self.metrics_of(imgs) if dist.is_main() else {}
            per_seed.append(m)
            times.append(round(t_sample, 2))
        metrics: dict = {"num_samples": int(self.g["num_samples"]), "sample_s": times}
        if dist.is_main():
            for k in METRIC_KEYS:
                vals = [m[k] for m in per_seed if k in m]
                if vals:
                    t = torch.tensor(vals, dtype=torch.float64)
                    metrics[k] = float(t.mean())
                    metrics[f"{k}_std"] = float(t.std()) if len(vals) > 1 else 0.0
                    metrics[f"{k}_seeds"] = [round(v, 4) for v in vals]
        if dist.world() > 1:  # every rank returns rank 0's metrics
            keys = [k for k in METRIC_KEYS]
            t = torch.tensor([metrics.get(k, 0.0) if dist.is_main() else 0.0 for k in keys], dtype=torch.float64)
            dist.all_reduce_sum(t)
            for k, v in zip(keys, t.tolist()):
                metrics.setdefault(k, v)
        return metrics, None
