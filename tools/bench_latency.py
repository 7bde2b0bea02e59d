#!/usr/bin/env python
"""Real integer inference latency in ONNX Runtime: FP32, W8A8 base, +QwT, +QwT-v2 (folded).

    python tools/bench_latency.py                                   # DeiT-T/S, Swin-T at 224, batch 8, CPU, 1 thread
    python tools/bench_latency.py --models deit_t,deit_s,deit_b,swin_t --batch 64 --reps 20
    python tools/bench_latency.py --providers cuda,tensorrt         # where onnxruntime-gpu is installed

Per model (timm, RANDOM weights, random 224 px images: latency does not depend on the values):
  fp32    the float model exported as is;
  base    ptq=hist_w8a8 at W8A8 (the QwT latency table's setting: symmetric per-tensor
          histogram-percentile, both attention matmul operands quantized), QDQ graph;
  qwt     base + QwT branches (fitted on --calib random images; ``--branch`` fp32 or fp16);
  qwt_v2  QwT-v2 folded into per-channel weight scales and biases (the same graph as base).
Each is exported with ``qwt.deploy.export_onnx`` (fixed batch) and run by an ONNX Runtime session
(default optimizations, MatMulAddFusion off, so QDQ pairs become integer kernels); repetitions are
interleaved (fp32, base, qwt, qwt_v2, fp32, ...) so that machine drift hits all alike. Reported: median
and IQR per variant, ratios of medians to base, and the median over rounds of (time / that round's
base time) ("paired"). Goals (reported, not asserted): qwt_v2 <= 1.02x base, qwt <= 1.15x base,
base faster than fp32.
Writes results/deploy/latency_<provider>_b<batch>.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # key: (timm name, label, timm kwargs)
    "deit_t": ("deit_tiny_patch16_224", "DeiT-T", {}),
    "deit_s": ("deit_small_patch16_224", "DeiT-S", {}),
    "deit_b": ("deit_base_patch16_224", "DeiT-B", {}),
    "swin_t": ("swin_tiny_patch4_window7_224", "Swin-T", {}),
}


def image_size(key: str) -> int:
    return int(MODELS[key][2].get("img_size", 224))
VARIANTS = ("fp32", "base", "qwt", "qwt_v2")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GOALS = {"qwt_v2": 1.02, "qwt": 1.15}


def build_variants(key: str, calib_n: int, branch: str, seed: int, log=print) -> dict:
    """{variant: torch model} for one timm architecture with random weights."""
    import timm

    from qwt.compensation import CompContext, apply_variant, method_settings
    from qwt.models import adapter_for
    from qwt.models.zoo import disable_fused_attention
    from qwt.ptq import apply_ptq, get_specs

    torch.manual_seed(seed)
    model = disable_fused_attention(timm.create_model(MODELS[key][0], pretrained=False, **MODELS[key][2]).eval())
    g = torch.Generator().manual_seed(seed + 1)
    size = image_size(key)
    xs = torch.randn(calib_n, 3, size, size, generator=g)

    def calib(n, transform, batch_size, shard=False):
        n = min(n, calib_n)
        return [xs[s : min(s + batch_size, n)] for s in range(0, n, batch_size)]

    fp = adapter_for(model)
    t0 = time.time()
    q = fp.clone()
    apply_ptq(q, get_specs("hist_w8a8", 8, 8), calib(calib_n, "eval", calib_n))
    settings = method_settings()
    for m in ("qwt", "qwt_v2"):
        settings[m].update(num_samples=calib_n, batch_size=calib_n)
    settings["qwt"]["branch_precision"] = branch
    out = {"fp32": model, "base": q.model}
    info = {}
    for v in ("qwt", "qwt_v2"):
        a = q.clone()
        info[v] = apply_variant(CompContext(a, fp, calib, None, "cpu", lambda *_: None), v, settings)[v]
        out[v] = a.model
    n_blocks = len(info["qwt"]["r2"])
    log(f"[bench] {key}: quantized + QwT ({info['qwt']['blocks_compensated']}/{n_blocks} blocks) + QwT-v2 "
        f"({info['qwt_v2']['layers_folded']} layers folded) in {time.time() - t0:.0f}s")
    return out, {"qwt_blocks": info["qwt"]["blocks_compensated"], "blocks": n_blocks,
                 "qwt_v2_layers_folded": info["qwt_v2"]["layers_folded"]}


def quartiles(v):
    return statistics.quantiles(v, n=4, method="inclusive")


def bench_sessions(sessions: dict, x, reps: int, warmup: int) -> dict:
    feed = {"input": x}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():  # interleaved
            t0 = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return times


def summarize(times: dict) -> dict:
    base = times["base"]
    out = {}
    for k, v in times.items():
        q1, med, q3 = quartiles(v)
        out[k] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
                  "vs_base": med / statistics.median(base),
                  "paired_vs_base": statistics.median(t / b for t, b in zip(v, base)), "reps": len(v)}
    return out


def markdown(rows: dict, batch: int, provider: str, threads: int) -> str:
    lines = [f"| model (batch {batch}, {provider}, {threads} thread{'s' if threads != 1 else ''}) | FP32 ms | W8A8 base ms | +QwT ms | +QwT-v2 ms | INT8 / FP32 | QwT / base | QwT-v2 / base |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        s = r["summary"]

        def cell(v):
            return f"{s[v]['median_ms']:.1f} ({s[v]['q1_ms']:.1f}-{s[v]['q3_ms']:.1f})"

        lines.append(f"| {MODELS[key][1]} | {cell('fp32')} | {cell('base')} | {cell('qwt')} | {cell('qwt_v2')} | "
                     f"{s['base']['median_ms'] / s['fp32']['median_ms']:.2f}x | {s['qwt']['vs_base']:.2f}x ({s['qwt']['paired_vs_base']:.2f}x) | "
                     f"{s['qwt_v2']['vs_base']:.2f}x ({s['qwt_v2']['paired_vs_base']:.2f}x) |")
    lines.append("(median (IQR) ms per batch over interleaved repetitions; ratios: of medians (paired: median of per-round ratios))")
    return "\n".join(lines)


def main(argv=None):
    import onnxruntime as ort

    from qwt.deploy.onnx_export import export_onnx, ort_session

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deit_t,deit_s,swin_t", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=10, help="timed interleaved repetitions per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--calib", type=int, default=4, help="random calibration images for stage 1, QwT and QwT-v2")
    p.add_argument("--branch", default="fp32", choices=["fp32", "fp16"], help="QwT branch precision (CPU: fp32; "
                   "ONNX Runtime's CPU provider runs float16 MatMul through casts)")
    p.add_argument("--providers", default="cpu", help="comma-separated: cpu, cuda, tensorrt (those available are run)")
    p.add_argument("--no-clip", action="store_true", help="export without the Clip that keeps symmetric grids at -127..127 "
                   "(QuantizeLinear then saturates at -128: not exactly our quantizer; one float op less per quantized activation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/deploy")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; use {sorted(MODELS)}")
    available = ort.get_available_providers()
    provs = []
    for name in args.providers.split(","):
        name = name.strip()
        if PROVIDERS.get(name) in available:
            provs.append(name)
        else:
            print(f"[bench] provider {name}: not available in this onnxruntime ({available}); skipped")
    if not provs:
        raise SystemExit("no requested execution provider is available")
    results = {pv: {} for pv in provs}
    t_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            size = image_size(key)
            x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed + 2)).numpy()
            models, info = build_variants(key, args.calib, args.branch, args.seed)
            paths, counts = {}, {}
            t0 = time.time()
            for v, m in models.items():
                paths[v] = Path(tmp) / f"{key}_{v}.onnx"
                c = export_onnx(m, torch.from_numpy(x[:1]).expand(args.batch, -1, -1, -1).contiguous(), paths[v], dynamic_batch=False,
                                exact_range=not args.no_clip)
                counts[v] = {"nodes": c["nodes"], "initializers": c["initializers"]}
            print(f"[bench] {key}: exported {len(paths)} graphs in {time.time() - t0:.0f}s; nodes "
                  + ", ".join(f"{v} {counts[v]['nodes']}" for v in paths))
            del models
            for pv in provs:
                sessions = {v: ort_session(paths[v], "all", threads=args.threads, providers=[PROVIDERS[pv]]) for v in VARIANTS}
                t0 = time.time()
                times = bench_sessions(sessions, x, args.reps, args.warmup)
                summ = summarize(times)
                results[pv][key] = {"summary": summ, "graph_counts": counts, "quantization": info,
                                    "times_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in times.items()}}
                print(f"[bench] {key} [{pv}] {time.time() - t0:.0f}s: " + ", ".join(
                    f"{v} {summ[v]['median_ms']:.1f} ms ({summ[v]['vs_base']:.2f}x)" for v in VARIANTS), flush=True)
                del sessions
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for pv in provs:
        print()
        print(markdown(results[pv], args.batch, pv.upper(), args.threads))
        for key, r in results[pv].items():
            s = r["summary"]
            goals = {"qwt_v2<=1.02x": s["qwt_v2"]["vs_base"] <= GOALS["qwt_v2"], "qwt<=1.15x": s["qwt"]["vs_base"] <= GOALS["qwt"],
                     "int8<fp32": s["base"]["median_ms"] < s["fp32"]["median_ms"]}
            r["goals"] = goals
            print(f"  {MODELS[key][1]}: " + ", ".join(f"{g} {'met' if ok else 'NOT met'}" for g, ok in goals.items()))
        doc = {"provider": pv, "batch": args.batch, "threads": args.threads, "reps": args.reps, "warmup": args.warmup,
               "calib_images": args.calib, "branch_precision": args.branch, "exact_range_clip": not args.no_clip, "onnxruntime": ort.__version__,
               "torch": torch.__version__, "weights": "random (timm, pretrained=False)", "ptq": "hist_w8a8 W8A8",
               "models": results[pv], "total_s": round(time.time() - t_all, 1),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = out / f"latency_{pv}_b{args.batch}.json"
        path.write_text(json.dumps(doc, indent=1))
        print(f"written: {path}")


if __name__ == "__main__":
    main()
