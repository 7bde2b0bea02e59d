#!/usr/bin/env python
"""Export the W8A8 uniformly quantized model -- base, +QwT, +QwT-v2 (folded), +QFT -- as ONNX QDQ
graphs, run them in ONNX Runtime and report parity with our fake-quant model.

    python tools/export_onnx.py                                    # embedded model, ptq=hist_w8a8, bits=w8a8
    python tools/export_onnx.py model=embedded_vit ptq=rtn         # any Hydra override of run.py
    python tools/export_onnx.py --out exports/x --variants none,qwt_v2 --fp32 ptq=percentile

Writes ``<out>/<variant>.onnx`` (default out: exports/<model>_<ptq>_w<w>a<a>/) and
results/deploy/export_<model>_<ptq>_w<w>a<a>.json. Parity, per variant, on the task's evaluation set
(the embedded benchmark by default), for two ONNX Runtime modes:
  none  graph optimizations off: the graph as exported (float ops on dequantized values; the
        exact reference of the QDQ graph),
  all   ONNX Runtime's default optimizations (QDQ fused into integer kernels: MatMulIntegerToFloat,
        ...), with MatMulAddFusion disabled (see qwt/deploy/onnx_export.py);
max |ORT output - our fake-quant output| and top-1 agreement between them (a classification task's
outputs are logits). QwT-v2 is folded (compensation.qwt_v2.fold=true); its graph must have exactly
the base graph's node and initializer counts (checked, printed). QFT is exported from its finalized
(frozen) state. Settings of each method: configs/compensation/_methods.yaml (Hydra overrides apply).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("none", "qwt", "qwt_v2", "qft")
DEFAULT_OVERRIDES = ["ptq=hist_w8a8", "bits=w8a8"]
MODES = ("none", "all")
EXACT_TOL = 1e-4  # a sample "matches" when every output differs by at most this


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    ov = [o for o in DEFAULT_OVERRIDES if o.split("=", 1)[0] not in given] + list(overrides)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=ov)
    return OmegaConf.to_container(cfg, resolve=True)


class Paired:
    """Callable for ``task.evaluate``: runs ONNX Runtime on each batch, and our model once per batch
    (cached by batch index across modes); records max |diff| and top-1 agreement; returns the ORT output."""

    def __init__(self, model, session, cache: list):
        from qwt.deploy.onnx_export import ort_forward

        self.model, self.ort, self.cache = model, ort_forward(session), cache
        self.i, self.max_diff, self.agree, self.n, self.ort_s = 0, 0.0, 0, 0, 0.0
        self.exact, self.sum_diff = 0, 0.0  # samples whose outputs match to 1e-4; sum of mean |diff| per sample

    @torch.no_grad()
    def __call__(self, x):
        if self.i == len(self.cache):
            self.cache.append(self.model(x).float().cpu())
        ref = self.cache[self.i]
        self.i += 1
        t0 = time.perf_counter()
        y = self.ort(x)
        self.ort_s += time.perf_counter() - t0
        d = (y - ref).abs().reshape(y.shape[0], -1)
        self.max_diff = max(self.max_diff, float(d.max()))
        self.exact += int((d.amax(1) <= EXACT_TOL).sum())
        self.sum_diff += float(d.mean(1).sum())
        if y.dim() == 2:
            self.agree += int((y.argmax(-1) == ref.argmax(-1)).sum())
        self.n += y.shape[0]
        return y


class _Shim:
    """What ``task.evaluate`` reads of an adapter: ``.model`` (called on each batch)."""

    def __init__(self, model):
        self.model = model


def quantized_variants(fp_adapter, calib, settings: dict, ptq: str, w_bits: int, a_bits: int, ptq_cfg: dict,
                       variants=VARIANTS, train_batches=None, supervised_loss=None, log=print) -> dict:
    """{variant: adapter}: stage 1 (``ptq``) once, then each compensation on a copy. ``calib(n,
    transform, batch_size, shard=False)`` gives calibration batches (the task's)."""
    from qwt.compensation import CompContext, apply_variant
    from qwt.ptq import apply_ptq, get_specs

    q = fp_adapter.clone()
    specs = get_specs(ptq, w_bits, a_bits, **ptq_cfg.get("options", {}))
    t0 = time.time()
    apply_ptq(q, specs, calib(int(ptq_cfg["num_samples"]), ptq_cfg["calib_transform"], int(ptq_cfg["batch_size"])),
              int(ptq_cfg.get("max_observer_elements", 2**23)), settings=ptq_cfg)
    log(f"[export] stage 1 {ptq} W{w_bits}A{a_bits}: {time.time() - t0:.1f}s")
    out = {}
    for v in variants:
        a = q.clone()
        t0 = time.time()
        ctx = CompContext(a, fp_adapter, calib, train_batches, "cpu", lambda *_: None, supervised_loss)
        apply_variant(ctx, v, settings)
        out[v] = a
        log(f"[export] {v}: {time.time() - t0:.1f}s")
    return out


def export_and_check(models: dict, example: torch.Tensor, out_dir: Path, evaluate, modes=MODES, threads: int = 1,
                     log=print) -> dict:
    """Export each model of ``models`` ({name: nn.Module}) to ``out_dir/<name>.onnx`` and compare
    ONNX Runtime with the model through ``evaluate(adapter_like) -> (metrics, _)`` (the task's
    evaluation; it calls ``adapter_like.model`` on each batch). Returns {name: report}."""
    from qwt.deploy.onnx_export import export_onnx, ort_optimized_ops, ort_session

    report = {}
    for name, model in models.items():
        model.eval()
        path = out_dir / f"{name}.onnx"
        t0 = time.time()
        counts = export_onnx(model, example, path)
        r = {"path": str(path), "nodes": counts["nodes"], "initializers": counts["initializers"], "ops": counts["ops"],
             "export_s": round(time.time() - t0, 2), "bytes": path.stat().st_size}
        r["ort_all_ops"] = ort_optimized_ops(path)
        cache: list = []
        r["torch"] = {k: round(float(v), 4) for k, v in evaluate(_Shim(model))[0].items()}
        for mode in modes:
            pair = Paired(model, ort_session(path, mode, threads=threads), cache)
            metrics = evaluate(_Shim(pair))[0]
            r[f"ort_{mode}"] = {**{k: round(float(v), 4) for k, v in metrics.items()}, "max_abs_diff": pair.max_diff,
                                "top1_agreement": round(100.0 * pair.agree / max(1, pair.n), 4), "n": pair.n,
                                "mean_abs_diff": pair.sum_diff / max(1, pair.n),
                                "samples_within_1e-4_pct": round(100.0 * pair.exact / max(1, pair.n), 4),
                                "ort_s": round(pair.ort_s, 3)}
        report[name] = r
        log(f"[export] {name}: {r['nodes']} nodes, {r['initializers']} initializers; "
            + "; ".join(f"ORT[{m}] max|diff| {r[f'ort_{m}']['max_abs_diff']:.2e}, agreement {r[f'ort_{m}']['top1_agreement']:.2f}%" for m in modes))
    return report


def fold_check(report: dict) -> dict | None:
    if "none" not in report or "qwt_v2" not in report:
        return None
    b, v = report["none"], report["qwt_v2"]
    return {"base": [b["nodes"], b["initializers"]], "qwt_v2": [v["nodes"], v["initializers"]],
            "equal": b["nodes"] == v["nodes"] and b["initializers"] == v["initializers"]}


def markdown(report: dict, modes=MODES, metric: str = "top1") -> str:
    head = f"| variant | nodes | initializers | ours {metric} |" + "".join(
        f" ORT[{m}] {metric} | ORT[{m}] max (mean) abs diff | ORT[{m}] outputs within 1e-4 % | ORT[{m}] agreement % |" for m in modes)
    lines = [head, "|" + "---|" * (4 + 4 * len(modes))]
    for name, r in report.items():
        row = f"| {name} | {r['nodes']} | {r['initializers']} | {r['torch'].get(metric, float('nan')):.2f} |"
        for m in modes:
            o = r[f"ort_{m}"]
            row += (f" {o.get(metric, float('nan')):.2f} | {o['max_abs_diff']:.1e} ({o['mean_abs_diff']:.1e}) |"
                    f" {o['samples_within_1e-4_pct']:.1f} | {o['top1_agreement']:.2f} |")
        lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides as for run.py (default model=embedded_vit, ptq=hist_w8a8, bits=w8a8)")
    p.add_argument("--out", default=None, help="folder for the .onnx files (default exports/<model>_<ptq>_w<w>a<a>)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated compensation variants")
    p.add_argument("--fp32", action="store_true", help="also export the float model (fp32.onnx)")
    p.add_argument("--results", default="results/deploy", help="folder of the JSON report ('' : none)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qwt.tasks.base import make_task

    c = compose(args.overrides)
    torch.manual_seed(int(c["seed"]))
    device = torch.device("cpu")
    task = make_task(c, device, print)
    fp_model = task.build_model().to(device).eval()
    fp_adapter = task.adapter(fp_model)
    w_bits, a_bits, ptq = int(c["bits"]["w"]), int(c["bits"]["a"]), c["ptq"]["name"]
    tag = f"{c['model']['name']}_{ptq}_w{w_bits}a{a_bits}"
    out_dir = Path(args.out or ROOT / "exports" / tag)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    t0 = time.time()
    adapters = quantized_variants(fp_adapter, task.calibration, c["compensation"], ptq, w_bits, a_bits, c["ptq"],
                                  variants, task.train_batches, task.supervised_loss)
    models = ({"fp32": fp_model} if args.fp32 else {}) | {v: a.model for v, a in adapters.items()}
    example = task.calibration(1, "eval", 1)[0]
    if not isinstance(example, torch.Tensor):
        raise SystemExit("export_onnx: this task's model input is not one tensor; only single-tensor models are exported")
    fp_preds = task.evaluate(fp_adapter, desc="eval fp")[1]

    def evaluate(shim):
        return task.evaluate(shim, reference=fp_preds, desc="eval")

    report = export_and_check(models, example, out_dir, evaluate, threads=args.threads)
    fold = fold_check(report)
    print()
    print(f"{tag}: ONNX QDQ export, ONNX Runtime {_ort_version()} CPU, {args.threads} thread(s); n = {next(iter(report.values()))['ort_none']['n']} evaluation inputs")
    print(markdown(report))
    if fold:
        print(f"\nQwT-v2 folded graph: {fold['qwt_v2'][0]} nodes / {fold['qwt_v2'][1]} initializers vs base "
              f"{fold['base'][0]} / {fold['base'][1]}: {'EQUAL' if fold['equal'] else 'NOT EQUAL'}")
    print(f"files: {out_dir}/ ({time.time() - t0:.0f}s)")
    if args.results:
        res = ROOT / args.results if not Path(args.results).is_absolute() else Path(args.results)
        res.mkdir(parents=True, exist_ok=True)
        doc = {"tag": tag, "model": c["model"]["name"], "ptq": ptq, "w_bits": w_bits, "a_bits": a_bits,
               "onnxruntime": _ort_version(), "torch": torch.__version__, "threads": args.threads,
               "fold_counts": fold, "variants": report, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (res / f"export_{tag}.json").write_text(json.dumps(doc, indent=1))
        print(f"report: {res / f'export_{tag}.json'}")
    if fold and not fold["equal"]:
        sys.exit(1)
    return report


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
