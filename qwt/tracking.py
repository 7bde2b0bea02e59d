"""W&B logging of result rows (offline by default; ``wandb sync <dir>`` uploads later).
One W&B run per result row, grouped by the pipeline's run_id.

Logging never costs a result: rows are written to the results file first; a tracker failure is
reported once, logging stops for the rest of the run, and the rows not logged can be replayed later
(``python tools/replay_wandb.py``). Every row that reached W&B has its key appended to
``<results file>.wandb-logged``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


class NullLogger:
    def log_row(self, row: dict, results_path: str | None = None) -> bool:
        return False


def logged_keys_path(results_path) -> Path:
    p = Path(results_path)
    return p.with_name(p.name + ".wandb-logged")


def mark_logged(results_path, key: str) -> None:
    with open(logged_keys_path(results_path), "a") as f:
        f.write(key + "\n")


def logged_keys(results_path) -> set[str]:
    p = logged_keys_path(results_path)
    return set(p.read_text().split()) if p.is_file() else set()


class WandbLogger:
    def __init__(self, cfg: dict):
        import wandb  # noqa: F401  (fail early with ImportError if missing)

        self.cfg = cfg
        self.failed = False

    def log_row(self, row: dict, results_path: str | None = None) -> bool:
        if self.failed:
            return False
        try:
            self._log(row)
        except Exception as e:  # noqa: BLE001  (a tracker problem must not end the experiment)
            self.failed = True
            where = results_path or "the results file"
            print(f"[qwt] W&B logging failed ({type(e).__name__}: {str(e)[:200]}); logging is off for this run. "
                  f"Every row is kept in {where}; upload them later with: python tools/replay_wandb.py --results {where}",
                  file=sys.stderr, flush=True)
            return False
        if results_path:
            mark_logged(results_path, row["config_key"])
        return True

    def _log(self, row: dict) -> None:
        import wandb

        os.makedirs(self.cfg.get("dir") or ".", exist_ok=True)
        run = wandb.init(
            project=self.cfg.get("project", "qwt"),
            entity=self.cfg.get("entity"),
            mode=self.cfg.get("mode", "offline"),
            dir=self.cfg.get("dir"),
            group=row.get("run_id"),
            name=f"{row.get('model')}-{row.get('ptq')}-w{row.get('w_bits')}a{row.get('a_bits')}-{row.get('compensation')}",
            config=row.get("config"),
            tags=[str(row.get(k)) for k in ("task", "ptq", "compensation")],
            reinit="finish_previous",
        )
        flat = {f"metrics/{k}": v for k, v in row["metrics"].items()}
        flat.update({f"fp/{k}": v for k, v in row["fp_metrics"].items()})
        flat.update({f"time/{k}": v for k, v in (row.get("timings") or {}).items()})
        for k in ("extra_params", "model_size_mb", "peak_mem_mb"):
            if k in row:
                flat[k] = row[k]
        run.log(flat)
        run.summary.update(flat)
        run.finish()


def make_logger(cfg: dict):
    kind = (cfg or {}).get("name", "none")
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(cfg)
    raise ValueError(f"logger={kind!r} is unknown: use logger=none or logger=wandb")
