"""Fail early: one pass over the resolved config before anything is computed. Every problem a user
can cause is a ``ConfigError`` naming the option, the bad value and the fix (run.py prints it
without a traceback and exits 2). Checks that need the task's data (sizes, layouts) run once the
task has built its data, still before the model or any computation.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

VARIANT_SETS = ("all", "paper", "none", "qwt", "qwt_star", "qwt_v2", "qft")
CALIBRATED = ("qwt", "qwt_v2", "qft")  # methods with their own calibration set (qwt_star uses qwt's)
MAX_W_BITS = 16
# calibration transforms: train / eval (every task); sampling (generation: points of the FP model's own
# sampling trajectories, Q-DiT's calibration); a task refuses the ones it does not have
CALIB_TRANSFORMS = ("train", "eval", "sampling")


def _int(c: dict, path: str, lo: int | None = None, hi: int | None = None, allow_none: bool = False):
    v = _get(c, path)
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{path}={v!r} must be an integer" + (f" >= {lo}" if lo is not None else ""))
    if lo is not None and v < lo:
        raise ConfigError(f"{path}={v} must be >= {lo}" + (f" (and <= {hi})" if hi is not None else ""))
    if hi is not None and v > hi:
        raise ConfigError(f"{path}={v} must be <= {hi}")
    return v


def _get(c: dict, path: str):
    cur = c
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _positive(c: dict, path: str):
    v = _get(c, path)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ConfigError(f"{path}={v!r} must be a positive number")


def check_config(c: dict) -> None:
    """Static checks: types and ranges, before any data or model is touched."""
    from .compensation import parse_steps, parse_variant, step_settings

    comp = c.get("compensation") or {}
    if "variants" not in comp:
        raise ConfigError("compensation has no 'variants': compensation=_methods is the shared settings file of every "
                          f"method, not a set of variants; choose compensation={'|'.join(VARIANT_SETS)} "
                          "or set compensation.variants=[none,qwt,...]")
    variants = comp["variants"]
    if isinstance(variants, str):
        raise ConfigError(f"compensation.variants={variants!r} is a string; it must be a list: "
                          f"compensation.variants=[{variants}] (or compensation={variants})")
    if not isinstance(variants, list) or not variants:
        raise ConfigError(f"compensation.variants={variants!r} must be a non-empty list, e.g. compensation.variants=[none,qwt]")
    seen = set()
    for v in variants:
        if not isinstance(v, str):
            raise ConfigError(f"compensation.variants entry {v!r} must be a string such as none, qwt or qft+qwt_v2")
        steps = tuple(parse_steps(v))
        for m, prof in steps:
            if prof is not None and m in comp:
                step_settings(comp, m, prof)  # the profile must exist
        if steps in seen:
            raise ConfigError(f"compensation.variants={variants} lists {v!r} twice: each variant once")
        seen.add(steps)

    bits = c.get("bits") or {}
    w = _int(c, "bits.w", 2, MAX_W_BITS)
    a = bits.get("a")
    if isinstance(a, bool) or not isinstance(a, int) or not (2 <= a <= 15 or a in (16, 32)):
        raise ConfigError(f"bits.a={a!r} must be an integer in 2..15, or 16 / 32 for float activations (weight-only, e.g. bits=w4a16)")
    del w

    rt = c.get("runtime") or {}
    _int(c, "runtime.eval_batch_size", 1)
    _int(c, "runtime.num_workers", 0)
    if rt.get("threads") is not None:
        _int(c, "runtime.threads", 1)

    ptq = c.get("ptq") or {}
    if ptq.get("name") != "fp":
        _int(c, "ptq.num_samples", 1)
        _int(c, "ptq.batch_size", 1)
        if ptq.get("calib_transform") not in CALIB_TRANSFORMS:
            raise ConfigError(f"ptq.calib_transform={ptq.get('calib_transform')!r}: use train or eval (generation also: sampling)")
    used = {s for v in variants for s in parse_variant(v)}
    for m in CALIBRATED:
        if m in used or (m == "qwt" and "qwt_star" in used):
            _int(c, f"compensation.{m}.num_samples", 1)
            _int(c, f"compensation.{m}.batch_size", 1)
            if (_get(c, f"compensation.{m}.calib_transform") or "train") not in CALIB_TRANSFORMS:
                raise ConfigError(f"compensation.{m}.calib_transform={_get(c, f'compensation.{m}.calib_transform')!r}: use train or eval (generation also: sampling)")
    if "qft" in used:
        _int(c, "compensation.qft.epochs", 1)
    if "qwt_star" in used:
        _int(c, "compensation.qwt_star.epochs", 0)
        _int(c, "compensation.qwt_star.batch_size", 1)
        _positive(c, "compensation.qwt_star.lr")
    if "qwt" in used or "qwt_star" in used:
        _int(c, "compensation.qwt.start_block", 0)

    data = c.get("data") or {}
    if data.get("val_subset") is not None:
        _int(c, "data.val_subset", 1)

    ckpt = (c.get("model") or {}).get("checkpoint")
    if ckpt and not os.path.isfile(str(ckpt)):
        raise ConfigError(f"model.checkpoint={ckpt} does not exist: give the path of the model's weights file")

    check_results_path(c)
    check_logger(c)


def check_sizes(c: dict, task) -> None:
    """Sizes against the task's data: every calibration set must exist in full."""
    from .compensation import parse_variant

    n = task.num_calibration_samples()
    if n is None:
        return
    checks = []
    if (c.get("ptq") or {}).get("name") != "fp":
        checks.append("ptq.num_samples")
    used = {s for v in c["compensation"]["variants"] for s in parse_variant(v)}
    for m in CALIBRATED:
        if m in used or (m == "qwt" and "qwt_star" in used):
            checks.append(f"compensation.{m}.num_samples")
    for path in checks:
        v = _get(c, path)
        if v > n:
            raise ConfigError(f"{path}={v} but the calibration data ({c['data']['name']}) has {n} samples: set {path}<={n}")


def check_results_path(c: dict) -> None:
    path = Path(str(_get(c, "results.path")))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "a"):
                pass
        else:  # probe the folder without creating the results file itself
            probe = path.with_name(f".{path.name}.probe{os.getpid()}")
            probe.write_text("")
            probe.unlink()
    except OSError as e:
        raise ConfigError(f"results.path={path} is not writable ({e.strerror}): choose another results.path=...") from e


def check_logger(c: dict) -> None:
    lg = c.get("logger") or {}
    if lg.get("name", "none") == "none":
        return
    if lg.get("name") != "wandb":
        raise ConfigError(f"logger={lg.get('name')!r} is unknown: use logger=none or logger=wandb")
    mode = os.environ.get("WANDB_MODE") or lg.get("mode", "offline")
    src = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "logger.mode"
    if mode not in ("offline", "online", "disabled", "dryrun", "run"):
        raise ConfigError(f"{src}={mode!r} is not a W&B mode: use offline (default), online or disabled")
    d = lg.get("dir") or "."
    try:
        Path(d).mkdir(parents=True, exist_ok=True)
        probe = Path(d) / f".qwt-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"logger.dir={d} is not writable ({e.strerror}): choose another logger.dir=...") from e
    if mode in ("online", "run") and not _wandb_key():
        raise ConfigError(f"{src}=online needs a W&B API key: run `wandb login` or set WANDB_API_KEY, or log offline "
                          "(logger.mode=offline; upload later with tools/replay_wandb.py or wandb sync)")


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
