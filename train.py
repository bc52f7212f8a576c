"""Train a classifier: ``python train.py +experiment=demo`` (see conf/ and README.md)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning_modules.run import train
    from lightning_modules.cli import run_job

    metrics = run_job(train, cfg, log)
    return metrics.get(cfg.get("optimized_metric", "val/acc"))


if __name__ == "__main__":
    main()
