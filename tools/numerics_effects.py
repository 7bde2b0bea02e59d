#!/usr/bin/env python
"""The effect of each numerics behaviour (configs/numerics/) on the embedded benchmark.

For each of the ten behaviours: start from `numerics=ours`, switch that one behaviour to the
reference, and run RepQ-ViT (+QwT) at each bit-width; also the `default` and `reference` profiles.
Prints a Markdown table of top-1 and logit MSE (to FP) for the base and +QwT, with the change
against `ours`, and writes every row to the results file (--results, default a scratch file).

    python tools/numerics_effects.py                       # W4A4 and W6A6, the default embedded config
    python tools/numerics_effects.py --bits w4a4 --extra data.val_subset=2000
"""
import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ITEMS = ["calibration_path", "reparam_zero", "quantile", "attention_scale", "reparam_bias", "log_zero",
         "uniform_range", "solver", "branch_precision", "edge_layers"]


def runs(bits_list):
    ref = yaml.safe_load((ROOT / "configs" / "numerics" / "reference.yaml").read_text())
    for bits in bits_list:
        yield bits, "ours", ["numerics=ours"]
        for k in ITEMS:
            yield bits, k, ["numerics=ours", f"numerics.{k}={ref[k]}"]
        yield bits, "default", ["numerics=default"]
        yield bits, "reference", ["numerics=reference"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", nargs="+", default=["w4a4", "w6a6"])
    ap.add_argument("--results", default="outputs/numerics_effects.jsonl")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args(argv)
    import torch
    from hydra import compose, initialize_config_dir

    from qwt.runner import run

    torch.set_num_threads(1)
    table = {}
    for bits, label, over in runs(args.bits):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"bits={bits}", "ptq=repq_vit", "compensation=qwt",
                                                           f"results.path={args.results}", *over, *args.extra])
        rows = run(cfg)
        if not rows:  # finished earlier: read the stored rows
            from qwt.results import config_key, read_rows
            from omegaconf import OmegaConf

            c = OmegaConf.to_container(cfg, resolve=True)
            stored = {r["config_key"]: r for r in read_rows(args.results)}
            digest = next(r["weights_digest"] for r in stored.values() if r.get("weights_digest"))
            rows = [stored[config_key(c, v, digest)] for v in ("none", "qwt")]
        table[bits, label] = {r["compensation"]: r["metrics"] for r in rows}
    print(render(table, args.bits))


def render(table, bits_list):
    def cell(m, key, base=None):
        v = m.get(key)
        if v is None:
            return "—"
        s = f"{v:.2f}" if key == "top1" else f"{v:.4f}"
        if base is not None and base.get(key) is not None:
            d = v - base[key]
            s += f" ({d:+.2f})" if key == "top1" else f" ({d:+.4f})"
        return s

    lines = []
    for bits in bits_list:
        lines += [f"\n{bits.upper()} (RepQ-ViT; change against `numerics=ours` in brackets)\n",
                  "| numerics | base top-1 | base logit MSE | +QwT top-1 | +QwT logit MSE |", "|---|---|---|---|---|"]
        ours = table[bits, "ours"]
        for label in ["ours", *ITEMS, "default", "reference"]:
            m = table[bits, label]
            b0, q0 = (None, None) if label == "ours" else (ours["none"], ours["qwt"])
            name = label if label in ("ours", "default", "reference") else f"ours + reference `{label}`"
            lines.append(f"| {name} | {cell(m['none'], 'top1', b0)} | {cell(m['none'], 'logit_mse', b0)} | "
                         f"{cell(m['qwt'], 'top1', q0)} | {cell(m['qwt'], 'logit_mse', q0)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
