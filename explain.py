"""Adversarial explanations of image files: ``python explain.py ckpt=PATH images=[a.png,b.jpg]`` (see conf/explain.yaml)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from jobs.help import register_help_resolver

log = logging.getLogger("explain")
register_help_resolver()  # --help: this entry point's groups and keys (conf/hydra/default.yaml)


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    from jobs.explain import explain
    from jobs.cli import run_job

    result = run_job(explain, cfg, log)
    if result["failures"]:
        sys.exit(2)  # each bad file was logged; the good ones have their outputs


if __name__ == "__main__":
    main()
