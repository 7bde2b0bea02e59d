"""The pipeline: FP model -> evaluate FP -> stage-1 PTQ -> for each compensation variant: apply the
chain, evaluate, write one result row. Everything task- or family-specific comes from the task
object (``task=<name>``, ``qwt/tasks/``) and the model's adapter; this module imports neither a
task module nor a model library, and it is the only file in ``qwt/`` that sees Hydra's config.

Memory (``runtime.memory``):
  copies  the FP model, the stage-1 model and one copy per variant (the FP model is the teacher of
          distillation losses, bit for bit the unquantized model);
  lean    one model: stage 1 quantizes the FP model in place (its float path *is* the FP model, so
          FP weights exist once), the stage-1 state is kept once (on the CPU when the device is a
          GPU and there are several variants) and each variant starts from a copy of it; teachers
          are the float path of the variant's own model.
``runtime.offload=cpu`` keeps the layer-wise engine's cached activations on the CPU.
"""
from __future__ import annotations

import os
import resource
import time
import uuid

import torch
from omegaconf import DictConfig, OmegaConf

from . import dist
from .compensation import CompContext, apply_variant, extra_params, model_size_mb, parse_variant
from .errors import ConfigError
from .models.base import FloatView
from .ptq import apply_ptq, get_specs
from .results import append_row, config_key, finished_keys, git_sha, now_iso, read_rows, versions
from .tasks.base import make_task
from .tracking import make_logger
from .validate import check_config, check_sizes


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
    seed = int(c["seed"])
    torch.manual_seed(seed)

    check_config(c)  # every option a user sets, before anything is built or computed
    variants = list(c["compensation"]["variants"])
    ptq_name = c["ptq"]["name"]
    if ptq_name == "fp" and any(parse_variant(v) for v in variants):
        raise ConfigError("ptq=fp (no quantization) has nothing to compensate: use compensation=none")
    memory = rt.get("memory", "copies")
    if memory not in ("copies", "lean"):
        raise ConfigError(f"runtime.memory={memory!r}: use copies or lean")
    store = None if rt.get("offload", "none") in (None, "none") else rt["offload"]

    # the task builds its data first: a missing dataset fails before any download / training
    task = make_task(c, device, log)
    check_sizes(c, task)
    if ptq_name == "hist_w8a8" and (int(c["bits"]["w"]), int(c["bits"]["a"])) != (8, 8):
        log(f"[qwt] note: ptq=hist_w8a8 is the method (histogram percentile, symmetric per tensor); it runs at "
            f"bits=w{c['bits']['w']}a{c['bits']['a']} here. The paper's W8A8 setting: bits=w8a8 (or +exp=w8a8_hist).")
    fp_model = task.build_model().to(device)
    fp_adapter = task.adapter(fp_model)
    digest = task.weights_digest(fp_model)
    keys = {v: config_key(c, v, digest) for v in variants}
    results_path = c["results"]["path"]
    done = finished_keys(results_path) if c["results"]["skip_finished"] else set()
    todo = [v for v in variants if keys[v] not in done]
    if not todo:
        log(f"[qwt] all {len(variants)} variants of this config are already in {results_path}; nothing to do "
            "(results.skip_finished=false recomputes). Stored results:")
        stored = {r["config_key"]: r for r in read_rows(results_path) if "config_key" in r}
        rows = [stored[keys[v]] for v in variants]
        if dist.is_main():
            print(task.format_table(rows, rows[0]["fp_metrics"]))
        return []
    if len(todo) < len(variants):
        log(f"[qwt] skipping {len(variants) - len(todo)} finished variants: {[v for v in variants if v not in todo]}")

    t0 = time.time()
    fp_metrics, fp_ref = task.evaluate(fp_adapter, desc="eval fp")
    fp_eval_s = time.time() - t0
    log(f"[qwt] FP {c['model']['name']}: {task.log_line(fp_metrics)}")

    w_bits, a_bits = int(c["bits"]["w"]), int(c["bits"]["a"])
    t0 = time.time()
    q_adapter = fp_adapter if memory == "lean" else fp_adapter.clone()
    ptq_info = {}
    if ptq_name != "fp":
        p = c["ptq"]
        specs = get_specs(ptq_name, w_bits, a_bits, **p.get("options", {}))
        batches = task.calibration(int(p["num_samples"]), p["calib_transform"], int(p["batch_size"]))
        ptq_info = apply_ptq(q_adapter, specs, batches, int(p["max_observer_elements"]), store=store, settings=p)
        del batches
    ptq_s = time.time() - t0
    log(f"[qwt] stage 1: {ptq_name} W{w_bits}A{a_bits} in {ptq_s:.1f}s")
    park = memory == "lean" and device.type == "cuda" and len(todo) > 1
    if park:  # the stage-1 state is kept once, off the device; each variant gets a device copy
        q_adapter.model.to("cpu")

    logger = make_logger(c["logger"]) if dist.is_main() else make_logger(None)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    sha, vers = git_sha(), versions()
    rows = []
    for i, variant in enumerate(todo):
        last = i == len(todo) - 1
        if memory == "lean":
            adapter = q_adapter if last else q_adapter.clone()
            adapter.model.to(device)
            teacher = FloatView(adapter)
        else:
            adapter, teacher = q_adapter.clone(), fp_adapter
        ctx = CompContext(adapter, teacher, task.calibration, task.train_batches, device, log,
                          task.supervised_loss, store)
        t0 = time.time()
        info = apply_variant(ctx, variant, c["compensation"])
        comp_s = time.time() - t0
        t0 = time.time()
        metrics, _ = task.evaluate(adapter, reference=fp_ref, desc=f"eval {variant}")
        eval_s = time.time() - t0
        row = {
            "run_id": run_id, "config_key": keys[variant], "exp": c.get("exp_name", "default"), "task": c["task"],
            "model": c["model"]["name"], "dataset": c["data"]["name"], "w_bits": w_bits, "a_bits": a_bits,
            "ptq": ptq_name, "compensation": variant, "metrics": metrics, "fp_metrics": fp_metrics,
            "headline": task.headline, "weights_digest": digest, "numerics": (c.get("numerics") or {}).get("name"),
            "timings": {"ptq_s": round(ptq_s, 3), "compensation_s": round(comp_s, 3), "eval_s": round(eval_s, 3), "fp_eval_s": round(fp_eval_s, 3)},
            "extra_params": extra_params(adapter.model), "model_size_mb": round(model_size_mb(adapter.model), 4),
            "peak_mem_mb": round(peak_mem_mb(device), 1), "seed": seed, "world_size": dist.world(), "device": str(device),
            "git_sha": sha, "versions": vers, "ptq_info": _jsonable(ptq_info), "compensation_info": _jsonable(info),
            "config": c, "finished_at": now_iso(),
        }
        if dist.is_main():
            if not append_row(results_path, row, replace=not c["results"]["skip_finished"]):
                log(f"[qwt] {variant}: a row with this key appeared meanwhile (the same config running elsewhere); not written twice")
            logger.log_row(row, results_path)
        rows.append(row)
        log(f"[qwt] {variant:<12} {task.log_line(metrics)}  ({comp_s:.1f}s)")
        if memory == "lean" and not last:
            del adapter, ctx, teacher
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if dist.is_main():
        print(task.format_table(rows, fp_metrics))
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
