"""Shared entry-point glue: user errors become one log line and exit code 2."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

USER_ERRORS = (ValueError, FileNotFoundError, MissingMandatoryValue, InterpolationResolutionError)


# Override keys that were renamed, and what replaced them (README.md says the same).
RENAMED_KEYS = {"adversarial": "method/adversarial"}


def register_resolvers() -> None:
    """``${robustx_dir:PATH}``: PATH, created if missing (an Optuna SQLite file needs its folder before any job runs)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    def ensure_dir(path: str) -> str:
        Path(path).mkdir(parents=True, exist_ok=True)
        return str(Path(path).resolve())

    if not OmegaConf.has_resolver("robustx_dir"):
        OmegaConf.register_new_resolver("robustx_dir", ensure_dir)


def refuse_renamed_overrides(argv: list[str]) -> None:
    """Exit 2 with one line when a command-line override uses a renamed key (before Hydra composes)."""
    for arg in argv:
        key = arg.lstrip("~+").split("=", 1)[0]
        if "=" in arg and key in RENAMED_KEYS:
            sys.stderr.write(f"error: '{key}=' was renamed; use {RENAMED_KEYS[key]}={arg.split('=', 1)[1]}\n")
            raise SystemExit(2)


def run_job(job: Callable[[DictConfig], Any], cfg: DictConfig, log: logging.Logger) -> Any:
    """Run ``job(cfg)``; a user error is logged as one line and exits with code 2 (HYDRA_FULL_ERROR=1 re-raises)."""
    try:
        return job(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(err).__name__, err)
        _remove_empty_run_folder(log)
        sys.exit(2)
    except OSError as err:
        from robustx.io.files import DISK_FULL

        if err.errno not in DISK_FULL or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # Every write is atomic (robustx.io.files, callbacks.checkpoint_io): the file keeps its previous version.
        log.error("disk full while writing %s (%s); that file keeps its previous version. Free space, then: %s",
                  err.filename or "a file", os.strerror(err.errno), _resume_hint())
        sys.exit(1)
    except RuntimeError as err:
        from robustx.utils import distributed_failure

        cause = distributed_failure(err)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # The survivors of a dead or stalled rank: one line each, then exit, instead of a traceback per rank.
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        log.error("rank %s: another DDP process died or stalled (%s); stopping this one too; %s", rank, cause, _resume_hint())
        sys.exit(1)


def _resume_hint() -> str:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        last = Path(HydraConfig.get().runtime.output_dir) / "checkpoints" / "last.ckpt"
        if last.is_file() and HydraConfig.get().job.name.startswith("train"):
            return f"resume with ckpt_path={last}"
    return "rerun the same command (finished work is cached or checkpointed where the job supports it)"


def _remove_empty_run_folder(log: logging.Logger) -> None:
    """Delete the Hydra run folder of a job that failed before writing anything but Hydra's own files.

    Such a folder holds nothing to resume or read, and left behind it looks like a run.
    """
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or os.environ.get("LOCAL_RANK") not in (None, "0"):
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    if not out.is_dir():
        return
    # Hydra's files, the job's log, and what loggers write when they start (the config as
    # hyperparameters, W&B's run folder) are no results: anything else (a checkpoint, a metrics
    # file, an output) keeps the folder.
    starts = [out / ".hydra", out / "wandb", out / "csv"]
    leftovers = [p for p in out.rglob("*") if p.is_file() and not any(d in p.parents for d in starts)
                 and not (p.parent == out and p.suffix == ".log")]
    if not leftovers:
        shutil.rmtree(out, ignore_errors=True)
        log.info("removed the run folder %s (nothing was written to it)", out)
