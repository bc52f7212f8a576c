"""Train a classifier: ``python train.py +experiment=demo`` (see conf/ and README.md)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from jobs.help import register_help_resolver
from jobs.schema import register_schemas

log = logging.getLogger("train")
register_help_resolver()  # --help: this entry point's groups and keys (conf/hydra/default.yaml)
register_schemas()  # conf/method/ starts from robustx.training.loss.MethodConfig's fields and defaults


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from jobs.train import train
    from jobs.cli import run_job

    metrics = run_job(train, cfg, log)
    return metrics.get(cfg.get("optimized_metric", "val/acc"))


if __name__ == "__main__":
    from jobs.cli import refuse_renamed_overrides

    refuse_renamed_overrides(sys.argv[1:])
    main()
