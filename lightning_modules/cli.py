"""Shared entry-point glue: user errors become one log line and exit code 2."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

USER_ERRORS = (ValueError, FileNotFoundError, MissingMandatoryValue, InterpolationResolutionError)


def run_job(job: Callable[[DictConfig], Any], cfg: DictConfig, log: logging.Logger) -> Any:
    """Run ``job(cfg)``; a user error is logged as one line and exits with code 2 (HYDRA_FULL_ERROR=1 re-raises)."""
    try:
        return job(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
