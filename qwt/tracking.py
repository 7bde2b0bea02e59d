"""W&B logging of result rows (offline by default; ``wandb sync <dir>`` uploads later).
One W&B run per result row, grouped by the pipeline's run_id."""
from __future__ import annotations

import os


class NullLogger:
    def log_row(self, row: dict) -> None:
        pass


class WandbLogger:
    def __init__(self, cfg: dict):
        import wandb  # noqa: F401  (fail early with ImportError if missing)

        self.cfg = cfg

    def log_row(self, row: dict) -> None:
        import wandb

        os.makedirs(self.cfg.get("dir") or ".", exist_ok=True)
        run = wandb.init(
            project=self.cfg.get("project", "qwt"),
            entity=self.cfg.get("entity"),
            mode=self.cfg.get("mode", "offline"),
            dir=self.cfg.get("dir"),
            group=row["run_id"],
            name=f"{row['model']}-{row['ptq']}-w{row['w_bits']}a{row['a_bits']}-{row['compensation']}",
            config=row["config"],
            tags=[row["task"], row["ptq"], row["compensation"]],
            reinit="finish_previous",
        )
        flat = {f"metrics/{k}": v for k, v in row["metrics"].items()}
        flat.update({f"fp/{k}": v for k, v in row["fp_metrics"].items()})
        flat.update({f"time/{k}": v for k, v in row["timings"].items()})
        flat.update(extra_params=row["extra_params"], model_size_mb=row["model_size_mb"], peak_mem_mb=row["peak_mem_mb"])
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
