"""Invalidation study, Grad-CAM manipulation and faithfulness of AEs and baselines: ``python study.py ckpt=PATH`` (see conf/study.yaml)."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

log = logging.getLogger("study")

USER_ERRORS = (ValueError, FileNotFoundError, MissingMandatoryValue, InterpolationResolutionError)


@hydra.main(version_base="1.3", config_path="conf", config_name="study")
def main(cfg: DictConfig) -> None:
    from lightning_modules.study_job import run_study

    try:
        run_study(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)


if __name__ == "__main__":
    main()
