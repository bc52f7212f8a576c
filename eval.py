"""Evaluate accuracy and the Accuracy-Robustness Areas of checkpoints: ``python eval.py ckpt=PATH`` (see conf/eval.yaml)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from jobs.help import register_help_resolver

log = logging.getLogger("eval")
register_help_resolver()  # --help: this entry point's groups and keys (conf/hydra/default.yaml)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from jobs.evaluate import evaluate
    from jobs.cli import run_job

    run_job(evaluate, cfg, log)


if __name__ == "__main__":
    main()
