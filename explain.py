"""Adversarial explanations of image files: ``python explain.py ckpt=PATH images=[a.png,b.jpg]`` (see conf/explain.yaml)."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

log = logging.getLogger("explain")

USER_ERRORS = (ValueError, FileNotFoundError, MissingMandatoryValue, InterpolationResolutionError)


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    from lightning_modules.explain_job import explain

    try:
        result = explain(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    if result["failures"]:
        sys.exit(2)  # each bad file was logged; the good ones have their outputs


if __name__ == "__main__":
    main()
