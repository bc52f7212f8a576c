"""Build and run a training job from a composed Hydra config (called by train.py)."""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from robustx.io.files import atomic_write

from lightning_modules.robust_classifier import RobustClassifier

log = logging.getLogger(__name__)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def _wandb_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the W&B server (only made when an API key exists)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def configure_wandb_mode() -> str:
    """Choose online/offline for W&B before any logger starts; say so in one log line."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        log.info("W&B mode is '%s' (WANDB_MODE); sync offline runs later with `wandb sync <dir>`.", mode)
        return mode
    if not _has_wandb_key():
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B: no API key found (WANDB_API_KEY or ~/.netrc), logging offline; `wandb sync` uploads later.")
        return "offline"
    if not _wandb_reachable():
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B: server not reachable, logging offline; `wandb sync` uploads later.")
        return "offline"
    return mode or "online"


def _run_names(cfg: DictConfig) -> tuple[str, str]:
    """W&B (group, name): one group per experiment, or per sweep in a multirun."""
    hc = HydraConfig.get()
    exp = cfg.get("experiment_name", "default")
    if hc.mode == RunMode.MULTIRUN:
        sweep_id = Path(hc.sweep.dir).name
        overrides = hc.job.override_dirname or f"job{hc.job.num}"
        return f"{exp}-{sweep_id}", f"{exp}-{overrides}"
    return exp, f"{exp}-{Path(hc.runtime.output_dir).name}"


def instantiate_loggers(cfg: DictConfig) -> list[Any]:
    loggers: list[Any] = []
    for key, lg_cfg in (cfg.get("logger") or {}).items():
        if not isinstance(lg_cfg, DictConfig) or "_target_" not in lg_cfg:
            continue
        if key == "wandb" or "Wandb" in str(lg_cfg._target_):
            mode = configure_wandb_mode()
            group, name = _run_names(cfg)
            lg_cfg = OmegaConf.merge(
                lg_cfg,
                {
                    "group": lg_cfg.get("group") or group,
                    "name": lg_cfg.get("name") or name,
                    "offline": bool(lg_cfg.get("offline")) or mode == "offline",
                },
            )
            Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        loggers.append(hydra.utils.instantiate(lg_cfg))
    return loggers


def instantiate_callbacks(cfg: DictConfig, *, has_logger: bool = True) -> list[pl.Callback]:
    bar = cfg.trainer.get("enable_progress_bar", True)
    return [
        hydra.utils.instantiate(cb)
        for cb in (cfg.get("callbacks") or {}).values()
        if isinstance(cb, DictConfig)
        and "_target_" in cb
        # trainer.enable_progress_bar=false must win over a configured progress-bar callback.
        and (bar or "ProgressBar" not in str(cb._target_))
        # LearningRateMonitor refuses a Trainer without logger (logger=none); metrics.json still has the LR.
        and (has_logger or "LearningRateMonitor" not in str(cb._target_))
    ]


def build_module(cfg: DictConfig) -> RobustClassifier:
    return RobustClassifier(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        method=OmegaConf.to_container(cfg.method, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        channels_last=bool(cfg.get("channels_last", False)),
        on_nonfinite=str(cfg.get("on_nonfinite", "stop")),
        max_nonfinite_skips=cfg.get("max_nonfinite_skips", 10),
    )


def _resolve_ckpt(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(hydra.utils.to_absolute_path(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"ckpt_path '{path}' does not exist; point it at a Lightning .ckpt (e.g. <run>/checkpoints/last.ckpt).")
    # Read it once here (weights only, as Lightning will) so a truncated, foreign or refused file is
    # one line naming the file, not a traceback from inside trainer.fit.
    from jobs.loading import CheckpointError, read_lightning_checkpoint

    try:
        ckpt = read_lightning_checkpoint(p)
    except CheckpointError as err:
        raise ValueError(f"ckpt_path '{path}' is not a readable Lightning checkpoint ({err}); pass the run's "
                         "checkpoints/last.ckpt, or leave ckpt_path unset to start over.") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"ckpt_path '{path}' is not a Lightning checkpoint (no state_dict); pass the run's checkpoints/last.ckpt.")
    missing = [k for k in ("optimizer_states", "lr_schedulers") if not isinstance(ckpt.get(k), list)]
    if missing:  # Lightning would stop inside trainer.fit with a KeyError traceback
        raise ValueError(f"ckpt_path '{path}' holds weights but no training state ({', '.join(missing)} missing: saved with "
                         "save_weights_only?); resume from the run's checkpoints/last.ckpt, or start over and load the weights.")
    return str(p)


def _own_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """This job's own ``checkpoints/last.ckpt`` when it is to resume by itself (``auto_resume``), else None.

    ``auto``: only inside a cluster job (submitit sets SUBMITIT_FOLDER), where a job that timed out or
    was preempted is requeued with the same config and output folder and must go on where it stopped,
    as a manual ``ckpt_path=`` resume does; ``true``: always; ``false``: never.
    """
    mode = str(cfg.get("auto_resume", "auto")).lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"auto_resume must be auto, true or false, got {cfg.get('auto_resume')!r}.")
    if mode == "false" or (mode == "auto" and "SUBMITIT_FOLDER" not in os.environ):
        return None
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    log.info("resuming this job from its own checkpoint %s (auto_resume=%s: a requeued or restarted job)", last, mode)
    return str(last)


def submitit_ranks() -> None:
    """Give Lightning the ranks of a several-task submitit job that SLURM does not describe (the local executor).

    Under SLURM, Lightning's SLURMEnvironment reads srun's variables. submitit's local executor starts
    ``tasks_per_node`` processes with its own variables only; without these Lightning would spawn
    more processes from each task. LOCAL_RANK/WORLD_SIZE/... make it use them as they are.
    """
    if "SUBMITIT_FOLDER" not in os.environ or "SLURM_NTASKS" in os.environ or "LOCAL_RANK" in os.environ:
        return
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    port = 20000 + int("".join(c for c in str(env.job_id) if c.isdigit()) or 0) % 20000
    os.environ.update(LOCAL_RANK=str(env.local_rank), NODE_RANK=str(env.node), WORLD_SIZE=str(env.num_tasks),
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def _refuse_existing_run(output_dir: Path, ckpt_path: str | None) -> None:
    """A run folder that holds an earlier run's checkpoints or metrics is resumed only on request.

    (Lightning would not resume by itself any more, see callbacks.InterruptCheckpoint, but a
    fresh run there would mix its checkpoints, metrics.json and W&B files with the earlier run's.)
    """
    if ckpt_path is not None or os.environ.get("LOCAL_RANK") not in (None, "0"):
        return  # an explicit resume; or a DDP child rank, which rank 0 has already checked
    ckpts = sorted(output_dir.glob("checkpoints/*.ckpt"))
    earlier = [p for p in (*ckpts, output_dir / "metrics.json") if p.is_file()]
    if earlier:
        last = output_dir / "checkpoints" / "last.ckpt"
        resume = last if last.is_file() else (ckpts[-1] if ckpts else None)
        how = f"resume it with ckpt_path={resume}" if resume else "resume is not possible (no checkpoint)"
        raise ValueError(
            f"run folder {output_dir} already holds an earlier run ({earlier[0].name}); {how}, "
            "or start fresh in a new folder (drop or change hydra.run.dir)."
        )


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def prepare_ddp_relaunch() -> None:
    """Make Lightning's DDP re-launch of this script run *this* job, also inside a Hydra multirun.

    Lightning starts ranks 1..N-1 as ``python train.py <sys.argv[1:]> hydra.run.dir=<run.dir>``.
    In a multirun, sys.argv holds ``-m`` and the whole sweep, and run.dir is not the job's
    folder, so each child would start a sweep of its own in the wrong place. Rewrite both to
    this job's overrides and output folder.
    """
    import sys

    from omegaconf import open_dict, read_write

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hc.overrides.task]
    node = HydraConfig.instance().cfg
    with read_write(node), read_write(node.hydra), read_write(node.hydra.run), open_dict(node.hydra.run):
        node.hydra.run.dir = hc.runtime.output_dir


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test, and export) the model described by ``cfg``; returns the final metrics."""
    env_before = dict(os.environ)
    try:
        return _train(cfg)
    finally:
        _finish_wandb()
        _teardown_distributed(env_before)


def objective(metrics: dict[str, float], cfg: DictConfig) -> float | None:
    """The number a Hydra sweeper optimizes: ``optimized_metric``, or ``objective_floor.penalty`` below the floor.

    ``objective_floor`` (``{metric, min, penalty}``; ``min: null`` turns it off) is the clean-accuracy
    constraint of a robustness sweep: a trial that buys ARA with accuracy below ``min`` scores ``penalty``.
    Outside a multirun a missing metric is None (a single run need not log it); in a sweep it is an error.
    """
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            hint = " (the ARA metrics need callbacks=ara with every_n_epochs > 0)" if "ara" in name else ""
            raise ValueError(f"optimized_metric '{name}' was not logged{hint}; logged: {', '.join(sorted(metrics))}.")
        return None
    value = float(metrics[name])
    floor = cfg.get("objective_floor") or {}
    if floor.get("min") is not None:
        if floor.get("metric") not in metrics:
            raise ValueError(f"objective_floor.metric '{floor.get('metric')}' was not logged; logged: {', '.join(sorted(metrics))}.")
        if float(metrics[floor["metric"]]) < float(floor["min"]):
            log.info("objective: %s=%.4f is below the floor %s; this trial scores %s instead of %s=%.4f", floor["metric"],
                     float(metrics[floor["metric"]]), floor["min"], floor.get("penalty", 0.0), name, value)
            return float(floor.get("penalty", 0.0))
    return value


def _finish_wandb() -> None:
    """End this job's W&B run, so that the next job of a multirun starts its own.

    Lightning's WandbLogger reuses a run that is still in progress in the process, which put
    every job of a sweep into job 0's run.
    """
    import sys

    wandb = sys.modules.get("wandb")  # imported only if a W&B logger was made
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _teardown_distributed(env_before: dict[str, str]) -> None:
    """Leave the process as a fresh one for the next job of a multirun.

    Lightning's DDP launch sets LOCAL_RANK, MASTER_PORT, ... in os.environ and keeps a process
    group; a second job in the same process would otherwise think its ranks already exist.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key in set(os.environ) - set(env_before):
        del os.environ[key]
    for key, value in env_before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _train(cfg: DictConfig) -> dict[str, float]:
    start = time.time()
    prepare_ddp_relaunch()
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    submitit_ranks()
    ckpt_path = _resolve_ckpt(cfg.get("ckpt_path") or _own_checkpoint(cfg, output_dir))
    _refuse_existing_run(output_dir, ckpt_path)

    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = build_module(cfg)
    loggers = instantiate_loggers(cfg)
    callbacks = instantiate_callbacks(cfg, has_logger=bool(loggers))
    from callbacks.checkpoint_io import AtomicCheckpointIO

    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                  plugins=[AtomicCheckpointIO()])

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams({"config": resolved})

    log.info("Output directory: %s", output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = _scalar_metrics(trainer.callback_metrics)
    if trainer.optimizers:
        # LearningRateMonitor's value is the LR of its last logging step; the per-step schedule
        # may have dropped it since: report the LR training ended with.
        opt = trainer.optimizers[0]
        metrics[f"lr-{type(opt).__name__}"] = float(opt.param_groups[0]["lr"])
    train_seconds = time.time() - start
    steps_this_run = trainer.global_step - module.first_step  # a resumed run timed only the steps it ran itself
    # Per-rank controller state: under DDP every rank must have used the same psi.
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"rank{trainer.global_rank}_state.json").write_text(
        json.dumps({"rank": trainer.global_rank, "psi": module.psi.psi, "psi_integral": module.psi.integral, "global_step": trainer.global_step})
    )

    if cfg.get("test"):
        test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update(_scalar_metrics(test_metrics[0] if test_metrics else {}))

    if trainer.is_global_zero:
        if cfg.get("export"):
            from robustx.io.export import save_model

            path = save_model(
                module.model,
                output_dir / "model.safetensors",
                model_config=module.model_config,
                metadata={
                    "experiment": str(cfg.get("experiment_name")),
                    "method": json.dumps(module.method.to_dict()),
                    "psi_integral": str(module.psi.integral),
                },
            )
            log.info("Exported model to %s", path)
        result = {
            "experiment": cfg.get("experiment_name"),
            "method": module.method.to_dict(),
            "metrics": metrics,
            "psi": module.psi.psi if module.method.penalty else None,
            "train_seconds": train_seconds,
            "global_steps": trainer.global_step,
            "steps_this_run": steps_this_run,
            "seconds_per_step": train_seconds / max(1, steps_this_run),
            "output_dir": str(output_dir),
        }
        atomic_write(output_dir / "metrics.json", json.dumps(result, indent=2))
        # 4 significant digits: the penalty (~1e-5) would read 0.0 rounded to 4 decimals.
        log.info("Final metrics: %s", {k: float(f"{v:.4g}") for k, v in metrics.items()})
        if cfg.get("bench") and cfg.bench.get("evaluate"):
            # The benchmark protocol (conf/experiment/bench_*.yaml): bench.json in the run folder.
            from jobs.bench import evaluate_run, scalar_metrics

            bench = scalar_metrics(evaluate_run(cfg, output_dir, result))
            for lg in loggers:
                lg.log_metrics(bench)
    for lg in loggers:
        lg.finalize("success")
    return metrics
