"""Result rows: one JSON object per (run, compensation variant), appended atomically to a JSON
Lines file. The row key (a hash of the resolved config that affects the result: everything but
where rows and logs go and the runtime, only the settings of the methods in the variant's chain,
and the FP weights' digest) lets a sweep skip rows that are already finished; the same key is
never written twice (checked under the file lock)."""
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
    """The row key of ``variant`` under ``config``: a base row ("none") is shared by every variant
    list that contains it, and a method's row does not depend on other methods' settings."""
    from .compensation import parse_variant

    relevant = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    comp = relevant.pop("compensation", None) or {}
    methods = {m: comp.get(m) for m in parse_variant(variant)}
    data = relevant.get("data")
    if isinstance(data, dict):  # where the datasets live (data.root, data.*_root) does not change the result
        relevant["data"] = {k: v for k, v in data.items() if k != "root" and not k.endswith("_root")}
    model = relevant.get("model")
    if isinstance(model, dict):
        relevant["model"] = {k: v for k, v in model.items() if k != "cache_dir"}
    key = {"config": relevant, "variant": variant, "methods": methods}
    if weights is not None:  # rows made from other weights are other results
        key["weights"] = weights
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _locked:
    """An exclusive lock on ``<path>.lock`` (a separate file, so a rewrite of the results file by
    ``os.replace`` never strands a writer on the old inode)."""

    def __init__(self, path: Path):
        self.lock = path.with_name(path.name + ".lock")

    def __enter__(self):
        self.fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        return False


def append_row(path: str | os.PathLike, row: dict, unique: bool = True, replace: bool = False) -> bool:
    """Append one row under the results file's lock: one write() of the whole line, fsync. A reader
    never sees a half row from us; a line cut by a crash is skipped by ``read_rows``.
    unique: skip the row if one with its ``config_key`` is already there (the same config launched
    twice); replace: instead drop the older row(s) with that key (``results.skip_finished=false``
    recomputes), rewriting the file atomically. Returns whether the row was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
    key = row.get("config_key")
    with _locked(path):
        if key and (unique or replace) and key in finished_keys(path, quiet=True):
            if not replace:
                return False
            _rewrite_without(path, key)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
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
            os.close(fd)
    ROWS_WRITTEN[str(path)] = ROWS_WRITTEN.get(str(path), 0) + 1
    return True


def _rewrite_without(path: Path, key: str) -> None:
    """Drop the complete rows with ``key`` (every other line kept byte for byte); atomic replace."""
    kept = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
                if isinstance(row, dict) and row.get("config_key") == key:
                    continue
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
            kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


ROWS_WRITTEN: dict[str, int] = {}  # rows this process appended, per file (for the interrupt message)
REQUIRED = ("config_key", "compensation", "metrics", "fp_metrics")


def read_rows(path: str | os.PathLike, quiet: bool = False) -> list[dict]:
    """Every complete row of the file. Lines that are not a complete row object (a line cut by a
    crash, a bare JSON value, an object without the row fields) are skipped with one warning."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(n)
                continue
            if not isinstance(row, dict) or any(k not in row for k in REQUIRED) or not isinstance(row.get("metrics"), dict):
                bad.append(n)
                continue
            rows.append(row)
    if bad and not quiet:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        print(f"[qwt] {path}: skipping {len(bad)} line(s) that are not complete result rows (line {shown})", file=sys.stderr)
    return rows


def finished_keys(path, quiet: bool = False) -> set[str]:
    return {r["config_key"] for r in read_rows(path, quiet=quiet)}


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
