"""The pipeline: FP model -> evaluate FP -> stage-1 PTQ -> for each compensation variant: copy,
apply the chain, evaluate, write one result row. Nothing task-specific beyond the task module;
the only file in ``qwt/`` that sees Hydra's config object."""
from __future__ import annotations

import os
import resource
import time
import uuid

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from . import dist
from .compensation import CompContext, apply_variant, extra_params, model_size_mb, parse_variant
from .models import adapter_for
from .models.zoo import build_model
from .ptq import apply_ptq, get_specs
from .results import append_row, config_key, finished_keys, git_sha, now_iso, read_rows, versions
from .errors import ConfigError
from .tasks.classification import build_data, calibration_batches, evaluate
from .tracking import make_logger


def log(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={name} but no CUDA device is visible; use runtime.device=cpu or auto")
    if name.startswith("cuda") and dist.world() > 1:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def run(cfg: DictConfig) -> list[dict]:
    c = OmegaConf.to_container(cfg, resolve=True)
    rt = c["runtime"]
    dist.init_from_env("cuda" if rt["device"] != "cpu" and torch.cuda.is_available() else "cpu")
    device = resolve_device(rt["device"])
    if rt.get("threads"):
        torch.set_num_threads(int(rt["threads"]))
    torch.manual_seed(int(c["seed"]))

    variants = list(c["compensation"]["variants"])
    for v in variants:
        parse_variant(v)
    ptq_name = c["ptq"]["name"]
    if ptq_name == "fp" and any(parse_variant(v) for v in variants):
        raise ConfigError("ptq=fp (no quantization) has nothing to compensate: use compensation=none")
    keys = {v: config_key(c, v) for v in variants}
    results_path = c["results"]["path"]
    done = finished_keys(results_path) if c["results"]["skip_finished"] else set()
    todo = [v for v in variants if keys[v] not in done]
    if not todo:
        log(f"[qwt] all {len(variants)} variants of this config are already in {results_path}; nothing to do "
            "(results.skip_finished=false recomputes). Stored results:")
        stored = {r["config_key"]: r for r in read_rows(results_path) if "config_key" in r}
        rows = [stored[keys[v]] for v in variants]
        if dist.is_main():
            print(format_table(rows, rows[0]["fp_metrics"], c))
        return []
    if len(todo) < len(variants):
        log(f"[qwt] skipping {len(variants) - len(todo)} finished variants: {[v for v in variants if v not in todo]}")

    # data before the model: a missing dataset fails before any download / training
    data = build_data(c["data"], c["model"])
    fp_model = build_model(c["model"], log=log).to(device)
    fp_adapter = adapter_for(fp_model)
    bs = int(rt["eval_batch_size"])
    t0 = time.time()
    fp_metrics, fp_preds = evaluate(fp_model, data, bs, device, rt["num_workers"], desc="eval fp")
    fp_eval_s = time.time() - t0
    log(f"[qwt] FP {c['model']['name']}: top-1 {fp_metrics['top1']:.2f}")

    seed = int(c["seed"])

    def calib(n, transform, batch_size, shard=False):
        return calibration_batches(data, n, transform, batch_size, seed, device, shard=shard)

    def train_batches(batch_size):
        g = torch.Generator().manual_seed(seed)
        for x, y in DataLoader(data.train, batch_size=batch_size, shuffle=True, generator=g, num_workers=rt["num_workers"]):
            yield x.to(device), y.to(device)

    w_bits, a_bits = int(c["bits"]["w"]), int(c["bits"]["a"])
    t0 = time.time()
    q_adapter = fp_adapter.clone()
    if ptq_name != "fp":
        p = c["ptq"]
        specs = get_specs(ptq_name, w_bits, a_bits, **p.get("options", {}))
        batches = [x for x, _ in calib(int(p["num_samples"]), p["calib_transform"], int(p["batch_size"]))]
        apply_ptq(q_adapter, specs, batches, int(p["max_observer_elements"]))
    ptq_s = time.time() - t0
    log(f"[qwt] stage 1: {ptq_name} W{w_bits}A{a_bits} in {ptq_s:.1f}s")

    logger = make_logger(c["logger"]) if dist.is_main() else make_logger(None)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    sha, vers = git_sha(), versions()
    rows = []
    for variant in todo:
        adapter = q_adapter.clone()
        ctx = CompContext(adapter, fp_adapter, calib, train_batches, device, log)
        t0 = time.time()
        info = apply_variant(ctx, variant, c["compensation"])
        comp_s = time.time() - t0
        t0 = time.time()
        metrics, _ = evaluate(adapter.model, data, bs, device, rt["num_workers"], fp_preds=fp_preds, desc=f"eval {variant}")
        eval_s = time.time() - t0
        row = {
            "run_id": run_id, "config_key": keys[variant], "exp": c.get("exp_name", "default"), "task": c["task"],
            "model": c["model"]["name"], "dataset": c["data"]["name"], "w_bits": w_bits, "a_bits": a_bits,
            "ptq": ptq_name, "compensation": variant, "metrics": metrics, "fp_metrics": fp_metrics,
            "timings": {"ptq_s": round(ptq_s, 3), "compensation_s": round(comp_s, 3), "eval_s": round(eval_s, 3), "fp_eval_s": round(fp_eval_s, 3)},
            "extra_params": extra_params(adapter.model), "model_size_mb": round(model_size_mb(adapter.model), 4),
            "peak_mem_mb": round(peak_mem_mb(device), 1), "seed": seed, "world_size": dist.world(), "device": str(device),
            "git_sha": sha, "versions": vers, "compensation_info": _jsonable(info), "config": c, "finished_at": now_iso(),
        }
        if dist.is_main():
            append_row(results_path, row)
            logger.log_row(row)
        rows.append(row)
        log(f"[qwt] {variant:<12} top-1 {metrics['top1']:.2f}  agreement {metrics.get('agreement', float('nan')):.2f}  ({comp_s:.1f}s)")
    if dist.is_main():
        print(format_table(rows, fp_metrics, c))
    return rows


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float):
        return round(x, 6)
    return x


def format_table(rows: list[dict], fp_metrics: dict, c: dict) -> str:
    head = f"{c['model']['name']} | {c['data']['name']} | {c['ptq']['name']} W{c['bits']['w']}A{c['bits']['a']}"
    lines = [head, f"{'variant':<14}{'top-1':>8}{'agree':>8}{'calib s':>9}{'extra params':>14}{'size MB':>9}", "-" * 62]
    lines.append(f"{'FP':<14}{fp_metrics['top1']:>8.2f}{'':>8}{'':>9}{'':>14}{'':>9}")
    for r in rows:
        m = r["metrics"]
        calib_s = r["timings"]["compensation_s"] + (r["timings"]["ptq_s"] if r["compensation"] == "none" else 0)
        name = "base" if r["compensation"] == "none" else r["compensation"]
        lines.append(f"{name:<14}{m['top1']:>8.2f}{m.get('agreement', float('nan')):>8.2f}{calib_s:>9.1f}{r['extra_params']:>14,d}{r['model_size_mb']:>9.3f}")
    return "\n".join(lines)
