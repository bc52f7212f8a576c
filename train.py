"""Train a classifier: ``python train.py +experiment=demo`` (see conf/ and README.md)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from jobs.cli import register_resolvers
from jobs.help import register_help_resolver
from jobs.schema import register_schemas

log = logging.getLogger("train")
register_help_resolver()  # --help: this entry point's groups and keys (conf/hydra/default.yaml)
register_schemas()  # conf/method/ starts from robustx.training.loss.MethodConfig's fields and defaults
register_resolvers()  # ${robustx_dir:...} (conf/hparams_search/optuna.yaml)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from jobs.train import train
    from jobs.cli import run_job

    from jobs.train import objective

    metrics = run_job(train, cfg, log)
    return run_job(lambda c: objective(metrics, c), cfg, log)


if __name__ == "__main__":
    from jobs.cli import refuse_renamed_overrides

    refuse_renamed_overrides(sys.argv[1:])
    main()
