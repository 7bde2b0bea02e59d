"""Entry point: compose the Hydra config and run the pipeline.

    python run.py                                  # embedded default (digits ViT, W4A4, every compensation)
    python run.py +exp=deit_w4a4 data.root=/data/imagenet
    python run.py -m +exp=deit_w4a4 bits=w4a4,w6a6 # sweep; finished rows are skipped on re-run
    python run.py --cfg job +exp=deit_w4a4         # print the resolved config
"""
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from qwt.runner import run
    from qwt.errors import ConfigError

    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
