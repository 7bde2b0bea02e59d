"""Entry point: compose the Hydra config and run the pipeline.

    python run.py                                  # embedded default (digits ViT, every compensation)
    python run.py +exp=deit_w4a4 data.root=/data/imagenet
    python run.py -m +exp=deit_w4a4 bits=w4a4,w6a6 # sweep; finished rows are skipped on re-run
    python run.py --cfg job +exp=deit_w4a4         # print the resolved config

A problem you can fix by changing an option prints one line naming it and exits 2 (set
HYDRA_FULL_ERROR=1 or QWT_DEBUG=1 for tracebacks). In a sweep (-m), a job that fails is reported
and the other jobs still run; the sweep then exits 1. Ctrl-C / SIGTERM stops with one line that
says which rows were kept; running the same command again resumes.
"""
import os
import signal
import sys
import traceback

import hydra
from omegaconf import DictConfig

FAILED: list = []  # (overrides, message) of failed jobs in this process


class Interrupted(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that no further work starts."""


def _debug() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("QWT_DEBUG") == "1"


def _on_term(signum, frame):
    raise Interrupted()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from qwt.errors import ConfigError
    from qwt.results import ROWS_WRITTEN
    from qwt.runner import run

    overrides = list(HydraConfig.get().overrides.task)
    try:
        run(cfg)
    except ConfigError as e:
        if _debug():
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        FAILED.append((overrides, "config"))
    except (KeyboardInterrupt, Interrupted) as e:
        kept = sum(ROWS_WRITTEN.values())
        where = ", ".join(ROWS_WRITTEN) or str(cfg.results.path)
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        print(f"\n{what}: {kept} result row(s) of this run were written and are kept ({where}); "
              "run the same command again to resume (finished variants are skipped)", file=sys.stderr, flush=True)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 143)
    except Exception:  # noqa: BLE001  (a bug: keep the traceback, let a sweep go on)
        if _debug():
            raise
        traceback.print_exc()
        FAILED.append((overrides, "error"))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_term)
    main()
    if FAILED:
        if "-m" in sys.argv or "--multirun" in sys.argv:
            print(f"{len(FAILED)} job(s) of the sweep failed (the others ran): "
                  + "; ".join(" ".join(o) or "(defaults)" for o, _ in FAILED), file=sys.stderr)
            sys.exit(1)
        sys.exit(2 if FAILED[0][1] == "config" else 1)
