"""Explore adversarial explanations in a local web app: ``python explore.py ckpt=PATH [data=NAME]`` (see conf/explore.yaml)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from jobs.help import register_help_resolver

log = logging.getLogger("explore")
register_help_resolver()  # --help: this entry point's groups and keys (conf/hydra/default.yaml)


@hydra.main(version_base="1.3", config_path="conf", config_name="explore")
def main(cfg: DictConfig) -> None:
    from jobs.cli import run_job
    from jobs.explore import serve

    run_job(serve, cfg, log)


if __name__ == "__main__":
    main()
