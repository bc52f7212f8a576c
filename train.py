"""Train a classifier: ``python train.py +experiment=demo`` (see conf/ and README.md)."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, InterpolationResolutionError

log = logging.getLogger("train")

USER_ERRORS = (ValueError, FileNotFoundError, MissingMandatoryValue, InterpolationResolutionError)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning_modules.run import train

    try:
        metrics = train(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # One line for user errors; HYDRA_FULL_ERROR=1 shows the traceback.
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    return metrics.get(cfg.get("optimized_metric", "val/acc"))


if __name__ == "__main__":
    main()
