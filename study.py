"""Invalidation study, Grad-CAM manipulation and faithfulness of AEs and baselines: ``python study.py ckpt=PATH`` (see conf/study.yaml)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from jobs.help import register_help_resolver

log = logging.getLogger("study")
register_help_resolver()  # --help: this entry point's groups and keys (conf/hydra/default.yaml)


@hydra.main(version_base="1.3", config_path="conf", config_name="study")
def main(cfg: DictConfig) -> None:
    from jobs.study import run_study
    from jobs.cli import run_job

    run_job(run_study, cfg, log)


if __name__ == "__main__":
    main()
