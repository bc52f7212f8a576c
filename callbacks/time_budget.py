"""TimeBudget: train for a fixed wall-clock budget, with the lr schedule laid out over that time."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from robustx.io.files import atomic_write

log = logging.getLogger(__name__)


class TimeBudget(pl.Callback):
    """Stop training after ``budget_minutes`` of wall-clock time and time every training step.

    Equal-compute comparisons between methods whose steps cost 1x-10x each other need a budget
    in seconds, not epochs. The clock starts when the first training epoch starts (after the
    sanity check) and counts everything after that (training steps and per-epoch validation).
    Training stops after the step during which the budget ran out (also mid-epoch; set
    ``trainer.min_epochs=0``).

    With ``lr_milestones`` (fractions of the budget, e.g. the paper's [0.85, 0.975]) the learning
    rate of every parameter group is multiplied by ``gamma`` at each milestone *of elapsed time*,
    so every method gets the whole schedule within its budget. This overrides the step-based
    schedule of the module; keep ``trainer.max_epochs`` large so that one never fires.

    At the end of training it writes ``timing.json`` (in ``output_dir``, default the trainer's
    ``default_root_dir``): train seconds (wall clock from the first epoch to the end of training),
    seconds inside training steps, steps, seconds per step, epochs, and the torch thread count.

    Args:
        budget_minutes: wall-clock budget (None or <= 0: no budget, only timing).
        lr_milestones: fractions of the budget at which the lr drops (None or []: constant lr).
        gamma: lr factor at each milestone.
        threads: ``torch.set_num_threads`` at the start of fit (None: leave it).
        output_dir: where ``timing.json`` goes.
    """

    def __init__(
        self,
        *,
        budget_minutes: float | None = None,
        lr_milestones: list[float] | None = None,
        gamma: float = 0.1,
        threads: int | None = None,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.budget = float(budget_minutes) * 60.0 if budget_minutes and budget_minutes > 0 else None
        self.milestones = sorted(float(m) for m in (lr_milestones or []))
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"lr_milestones are fractions of the time budget in (0, 1), got {self.milestones}.")
        if self.milestones and self.budget is None:
            raise ValueError("lr_milestones need a time budget (budget_minutes > 0).")
        self.gamma = float(gamma)
        self.threads = int(threads) if threads else None
        self.output_dir = output_dir
        self.start: float | None = None
        self.step_seconds = 0.0
        self.steps = 0
        self._t_batch = 0.0
        self._base_lrs: list[list[float]] = []
        self.stopped_by_budget = False
        self.lr_changes: list[dict[str, float]] = []  # when the time schedule changed the lr
        self._factor = 1.0

    def elapsed(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start

    def lr_factor(self, elapsed: float) -> float:
        """gamma ** (number of milestones passed at ``elapsed`` seconds)."""
        if self.budget is None:
            return 1.0
        return self.gamma ** sum(1 for m in self.milestones if elapsed >= m * self.budget)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()
        self._base_lrs = [[g.get("initial_lr", g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]
        if self.budget is not None:
            log.info("time budget %.1f min (lr x%g at %s of it)", self.budget / 60, self.gamma, self.milestones or "none")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.milestones:
            f = self.lr_factor(self.elapsed())
            if f != self._factor:
                self._factor = f
                self.lr_changes.append({"step": self.steps, "seconds": self.elapsed(), "factor": f})
                log.info("time budget: lr x%g from step %d (%.1f s)", f, self.steps, self.elapsed())
            for opt, bases in zip(trainer.optimizers, self._base_lrs):
                for g, base in zip(opt.param_groups, bases):
                    g["lr"] = base * f
        self._t_batch = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds += time.perf_counter() - self._t_batch
        self.steps += 1
        if self.budget is not None and self.elapsed() >= self.budget and not trainer.should_stop:
            trainer.should_stop = True
            self.stopped_by_budget = True
            log.info("time budget reached after %d steps (%.1f s)", self.steps, self.elapsed())

    def summary(self, trainer: pl.Trainer) -> dict:
        return {
            "budget_seconds": self.budget,
            "train_seconds": self.elapsed(),
            "step_seconds": self.step_seconds,
            "steps": self.steps,
            "seconds_per_step": self.step_seconds / max(1, self.steps),
            "epochs": self.steps / trainer.num_training_batches if 0 < trainer.num_training_batches < float("inf") else None,
            "stopped_by_budget": self.stopped_by_budget,
            "lr_milestones": self.milestones,
            "lr_changes": self.lr_changes,
            "threads": torch.get_num_threads(),
        }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(self.output_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "timing.json", json.dumps(self.summary(trainer), indent=2))
