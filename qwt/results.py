"""Result rows: one JSON object per (run, compensation variant), appended atomically to a JSON
Lines file; the run key (a hash of the resolved config that affects results, plus the variant)
lets a sweep skip rows that are already finished."""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# config keys that do not change a result (where rows go, logging, devices, workers, verbosity)
NON_RESULT_KEYS = ("results", "logger", "runtime", "hydra")


def state_digest(model) -> str:
    """A digest of a model's float weights (every state-dict tensor, in key order; tensors of more
    than 2^20 elements contribute their shape, sum and a fixed strided sample of 2^20 elements)."""
    import torch

    h = hashlib.blake2b(digest_size=8)
    for k, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.reshape(-1)
        if flat.numel() > 2**20:
            h.update(repr(float(flat.double().sum())).encode())
            flat = flat[:: flat.numel() // 2**20]
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes() if flat.dtype != torch.bool else flat.cpu().numpy().tobytes())
    return h.hexdigest()


def config_key(config: dict, variant: str, weights: str | None = None) -> str:
    relevant = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    data = relevant.get("data")
    if isinstance(data, dict):  # where the dataset lives does not change the result
        relevant["data"] = {k: v for k, v in data.items() if k != "root"}
    model = relevant.get("model")
    if isinstance(model, dict):
        relevant["model"] = {k: v for k, v in model.items() if k != "cache_dir"}
    key = {"config": relevant, "variant": variant}
    if weights is not None:  # rows made from other weights are other results
        key["weights"] = weights
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append one row: exclusive lock, one write() of the whole line, fsync. A reader never sees a
    half row from us; a line cut by a crash is skipped by ``read_rows``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # a previous crash may have left a partial last line: start ours on a fresh line
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"[qwt] {path}:{n}: skipping an unreadable (truncated?) row", file=sys.stderr)
    return rows


def finished_keys(path) -> set[str]:
    return {r["config_key"] for r in read_rows(path) if "config_key" in r}


def git_sha() -> str:
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "timm", "hydra", "omegaconf", "numpy", "sklearn", "wandb"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
