#!/usr/bin/env python
"""Train an embedded model once and write its shipped weights (an explicit command; runs never train).

    python tools/train_embedded.py embedded_vit          # configs/model/embedded_vit.yaml
    python tools/train_embedded.py embedded_vit --threads 2

The model config names its trainer (``train.entry: "package.module:function"``); the function is
called as ``fn(model_cfg, log) -> (state_dict, training_log)``, and the result is saved with
``qwt.models.shipped.save_shipped`` (weights + recipe + sha256 under ``qwt/models/weights/``).
Training is seeded and single-threaded by default; other CPUs may produce other weights, which is
why the weights are committed.
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model config name under configs/model/ (e.g. embedded_vit)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's train.threads, else 1)")
    args = ap.parse_args()
    from qwt.models.shipped import save_shipped

    path = ROOT / "configs" / "model" / f"{args.model}.yaml"
    if not path.is_file():
        raise SystemExit(f"no model config {path}")
    cfg = yaml.safe_load(path.read_text())
    entry = (cfg.get("train") or {}).get("entry")
    if not entry:
        raise SystemExit(f"{path.name} has no train.entry: it is not an embedded model trained by this project")
    torch.set_num_threads(args.threads or int(cfg["train"].get("threads", 1)))
    mod, _, fn = entry.partition(":")
    t0 = time.time()
    state, log = getattr(importlib.import_module(mod), fn)(cfg, print)
    log = dict(log or {}, train_seconds=round(time.time() - t0, 1), threads=torch.get_num_threads())
    out = save_shipped(cfg["name"], state, recipe={k: v for k, v in cfg.items() if k != "cache_dir"}, log=log,
                       dtype=cfg.get("weights_dtype", "float32"))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MB) in {log['train_seconds']}s")


if __name__ == "__main__":
    main()
