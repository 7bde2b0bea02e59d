#!/usr/bin/env python
"""Log result rows from a results file to W&B: the rows that never reached W&B (a tracker failure,
or runs made with logger=none), or every row with --all.

    python tools/replay_wandb.py                                   # results/runs.jsonl, offline
    python tools/replay_wandb.py --results r.jsonl --mode online   # needs `wandb login`
    python tools/replay_wandb.py --all --dir outputs/wandb

Offline runs land in <dir>/wandb/offline-run-*; upload them with `wandb sync`. Each logged row's key
is recorded in <results>.wandb-logged, so a replay is never repeated.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from qwt.results import read_rows
    from qwt.tracking import WandbLogger, logged_keys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "results" / "runs.jsonl"))
    ap.add_argument("--mode", default="offline", choices=["offline", "online"])
    ap.add_argument("--dir", default="outputs/wandb")
    ap.add_argument("--project", default="qwt")
    ap.add_argument("--entity", default=None)
    ap.add_argument("--all", action="store_true", help="replay every row, also those already logged")
    args = ap.parse_args(argv)
    rows = read_rows(args.results)
    done = set() if args.all else logged_keys(args.results)
    todo = [r for r in rows if r["config_key"] not in done]
    if not todo:
        print(f"nothing to replay: all {len(rows)} rows of {args.results} are already logged (--all replays them)")
        return 0
    logger = WandbLogger({"name": "wandb", "mode": args.mode, "dir": args.dir, "project": args.project, "entity": args.entity})
    n = 0
    for r in todo:
        if not logger.log_row(r, args.results):
            break
        n += 1
    print(f"logged {n} of {len(todo)} rows to W&B ({args.mode}, {args.dir})")
    return 0 if n == len(todo) else 1


if __name__ == "__main__":
    sys.exit(main())
