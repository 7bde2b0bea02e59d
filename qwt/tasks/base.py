"""What a task family owns, and the registry ``task=<name>`` selects from.

A task builds its data and its float model, hands out calibration batches in the form its
model's adapter consumes (``stem(batch)``), evaluates a model into named metrics (one of them the
headline), and prints the result table. The runner (``qwt/runner.py``) only talks to this
interface, so it imports no task and no model library; task modules are imported lazily by name.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models.base import ModelAdapter, adapter_for

# task name -> "module:Class" (imported only when selected)
TASKS = {
    "classification": "qwt.tasks.classification:ClassificationTask",
    "zeroshot": "qwt.tasks.zeroshot:ZeroShotTask",
    "language": "qwt.tasks.language:LanguageModelingTask",
}


def register_task(name: str, path: str) -> None:
    TASKS[name] = path


def make_task(cfg: dict, device: torch.device, log: Callable = print) -> "Task":
    name = cfg.get("task")
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is unknown: use one of {sorted(TASKS)}")
    mod, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(mod), cls)(cfg, device, log)


class Task:
    """Base of every task family. ``cfg`` is the whole resolved config (plain dict)."""

    name = "base"
    headline = "metric"  # key of the headline metric in ``evaluate``'s metrics
    # columns of the printed table: (metric key, label, format); missing metrics print blank
    table_columns: tuple = ()
    higher_is_better = True

    def __init__(self, cfg: dict, device: torch.device, log: Callable = print):
        self.cfg, self.device, self.log = cfg, device, log
        self.seed = int(cfg.get("seed", 0))

    # -- model ----------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from ..models.zoo import build_model

        return build_model(self.cfg["model"], log=self.log)

    def adapter(self, model: nn.Module) -> ModelAdapter:
        return adapter_for(model)

    def weights_digest(self, model: nn.Module) -> str:
        """A digest of the float model's weights (part of every result row's key)."""
        from ..results import state_digest

        return state_digest(model)

    # -- data -----------------------------------------------------------------------------
    def calibration(self, n: int, transform: str, batch_size: int, shard: bool = False) -> list:
        """``n`` calibration samples as batches the adapter's stem consumes, on the device."""
        raise NotImplementedError

    def train_batches(self, batch_size: int) -> Iterable | None:
        """One epoch of (batch, target) for supervised finetuning (QwT*); None if the task has none."""
        return None

    supervised_loss: Callable | None = None  # (model output, target) -> loss, for QwT*

    def num_calibration_samples(self) -> int | None:
        """How many calibration samples exist (for validation); None if unbounded."""
        return None

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, adapter: ModelAdapter, reference=None, desc: str = "eval") -> tuple[dict, object]:
        """(metrics, outputs): ``reference`` is what the FP evaluation returned as outputs, so
        quantized models can be compared with FP (agreement, logit distances)."""
        raise NotImplementedError

    # -- reporting ------------------------------------------------------------------------
    def log_line(self, metrics: dict) -> str:
        parts = []
        for key, label, fmt in self.table_columns:
            if key in metrics and metrics[key] is not None:
                parts.append(f"{label} {fmt.format(metrics[key])}")
        return "  ".join(parts)

    def format_table(self, rows: list[dict], fp_metrics: dict) -> str:
        c = self.cfg
        head = f"{c['model']['name']} | {c['data']['name']} | {c['ptq']['name']} W{c['bits']['w']}A{c['bits']['a']}"
        cols = [(k, lab, fmt) for k, lab, fmt in self.table_columns]
        widths = [max(9, len(lab) + 2) for _, lab, _ in cols]
        header = f"{'variant':<14}" + "".join(f"{lab:>{w}}" for (_, lab, _), w in zip(cols, widths)) + f"{'calib s':>9}{'extra params':>14}{'size MB':>9}"
        lines = [head, header, "-" * len(header)]

        def cells(m):
            out = ""
            for (k, _, fmt), w in zip(cols, widths):
                v = m.get(k)
                out += f"{fmt.format(v) if v is not None else '':>{w}}"
            return out

        lines.append(f"{'FP':<14}" + cells({k: v for k, v in fp_metrics.items() if k in dict((c_[0], 1) for c_ in cols)}))
        for r in rows:
            calib_s = r["timings"]["compensation_s"] + (r["timings"]["ptq_s"] if r["compensation"] == "none" else 0)
            name = "base" if r["compensation"] == "none" else r["compensation"]
            lines.append(f"{name:<14}" + cells(r["metrics"]) + f"{calib_s:>9.1f}{r['extra_params']:>14,d}{r['model_size_mb']:>9.3f}")
        return "\n".join(lines)
