"""RobustClassifier: a classifier trained with any method of :mod:`robustx.training.loss`."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from robustx.models import build_model
from robustx.training.loss import MethodConfig, training_loss

log = logging.getLogger(__name__)

DEFAULT_OPTIM: dict[str, Any] = {
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "nesterov": False,
    # The paper divides the learning rate by 10 after epochs 170 and 195 of 200.
    "milestones": [0.85, 0.975],
    "gamma": 0.1,
}


NONFINITE_ACTIONS = ("stop", "skip")


class TrainingDiverged(ValueError):
    """Training produced a NaN/inf loss, psi or weights; the fit stops before anything bad is saved."""


def _fix_hint(method: MethodConfig) -> str:
    hint = "lower optim.lr"
    if method.penalty and method.adaptive:
        hint += " or method.l_target (adaptive psi grows without bound when the target is not reached)"
    return hint + ", or set on_nonfinite=skip to drop such batches"


class RobustClassifier(pl.LightningModule):
    """Classifier + regularized loss + optional adversarial examples (paper, Methods).

    Args:
        model: ``{"_target_": "robustx.models.<Model>", **kwargs}``; built through the allowlist
            of :func:`robustx.models.build_model`, so exported configs stay data, not code.
        method: :class:`robustx.training.loss.MethodConfig` fields (penalty, psi, adversarial).
        optim: SGD settings; ``milestones`` are fractions of the total number of steps.
        channels_last: store activations NHWC (faster convolutions on CPU with bf16).
        on_nonfinite: what a training step with a NaN/inf loss or psi does (not in the paper):
            ``stop`` ends the fit with :class:`TrainingDiverged` before the optimizer step, so the
            weights and the last checkpoint stay good; ``skip`` drops that batch (no update) and
            stops after ``max_nonfinite_skips`` such batches in a row.
        max_nonfinite_skips: consecutive skipped batches tolerated with ``on_nonfinite=skip`` (>= 1).
    """

    def __init__(
        self,
        *,
        model: dict[str, Any],
        method: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        channels_last: bool = False,
        on_nonfinite: str = "stop",
        max_nonfinite_skips: int = 10,
    ) -> None:
        super().__init__()
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not one of {NONFINITE_ACTIONS}; use stop (default) or skip.")
        if isinstance(max_nonfinite_skips, bool) or not isinstance(max_nonfinite_skips, int) or max_nonfinite_skips < 1:
            raise ValueError(f"max_nonfinite_skips must be an integer >= 1, got {max_nonfinite_skips!r}.")
        self.save_hyperparameters()
        self.method = MethodConfig.from_dict(dict(method or {}))
        model_cfg = dict(model)
        # One route for the activation: method.activation (relu, or the paper's half-Huber ReLU).
        if model_cfg.get("activation", self.method.activation) != self.method.activation:
            raise ValueError(f"model.activation={model_cfg['activation']!r} disagrees with method.activation="
                             f"{self.method.activation!r}; set method.activation only (the model takes it from there).")
        model_cfg["activation"] = self.method.activation
        self.model_config = model_cfg
        self.model = build_model(model_cfg)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        optim = {**DEFAULT_OPTIM, **dict(optim or {})}
        unknown = set(optim) - set(DEFAULT_OPTIM)
        if unknown:
            raise ValueError(f"Unknown optim option(s) {sorted(unknown)}; valid: {sorted(DEFAULT_OPTIM)}.")
        if optim["lr"] <= 0 or optim["weight_decay"] < 0:
            raise ValueError(f"optim.lr must be > 0 and weight_decay >= 0, got {optim['lr']}, {optim['weight_decay']}.")
        if any(not 0 < f <= 1 for f in optim["milestones"]):
            raise ValueError(f"optim.milestones are fractions of training in (0, 1], got {optim['milestones']}.")
        self.optim = optim
        self.psi = self.method.make_psi()
        num_classes = int(model_cfg.get("num_classes", 10))
        self.num_classes = num_classes
        m = self.method
        if m.penalty and m.adaptive and num_classes > 1 and m.l_target >= math.log(num_classes):
            # A CE target at or above a uniform guess's (ln C) is never reached by a network that
            # learns anything, so the integrator (paper Eq. for psi) only grows: psi explodes and the
            # network collapses (measured: Fashion-MNIST, l_target=3.0 -> test accuracy 0.20).
            log.warning(
                "method.l_target=%g is >= ln(%d)=%.2f, the cross-entropy of a uniform guess: adaptive psi will grow "
                "without bound and training will collapse; use a target below %.2f (default 1.5).",
                m.l_target, num_classes, math.log(num_classes), math.log(num_classes),
            )
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.first_step = 0  # global step this fit started at (> 0 when resumed)
        self.nonfinite_in_a_row = 0

    def on_train_start(self) -> None:
        self.first_step = self.trainer.global_step  # already restored from a resumed checkpoint here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._layout(x))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        # Every rank must feed the controller the same number, or psi diverges across ranks.
        if self.trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(t, reduce_op="mean")
        return t

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = training_loss(self.model, self._layout(x), y, self.method, self.psi, reduce_mean=self._reduce_mean)
        if self._nonfinite(out):
            return None  # Lightning skips the backward pass and the optimizer step of this batch
        self.train_acc(out.logits.detach().argmax(1), y)
        self.log("train/loss", out.loss.detach(), prog_bar=False)
        self.log("train/ce", out.ce.detach(), prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=True)
        if self.method.penalty:
            self.log("train/penalty", out.penalty)
            self.log("train/psi", out.psi, prog_bar=True)
            self.log("train/psi_integral", self.psi.integral)
        return out.loss

    def _nonfinite(self, out) -> bool:
        """True if this batch is skipped; raises :class:`TrainingDiverged` when the fit must stop.

        One host sync per step. Under DDP the ranks agree (a sum of flags), so that no rank
        leaves the others waiting in the gradient all-reduce.
        """
        bad = ~torch.isfinite(out.loss.detach().float())
        if self.method.penalty:
            bad = bad | (not math.isfinite(out.psi))
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        if not bool(bad):
            self.nonfinite_in_a_row = 0
            return False
        step, epoch = self.global_step, self.current_epoch
        what = (f"loss={float(out.loss.detach()):.4g} (cross-entropy {float(out.ce.detach()):.4g}"
                + (f", penalty {float(out.penalty):.4g}, psi {out.psi:.4g}" if self.method.penalty else "") + ")")
        self.nonfinite_in_a_row += 1
        if self.hparams.on_nonfinite == "skip" and self.nonfinite_in_a_row <= self.hparams.max_nonfinite_skips:
            log.warning("step %d (epoch %d): non-finite %s; batch skipped (%d in a row, at most %d)", step, epoch, what,
                        self.nonfinite_in_a_row, self.hparams.max_nonfinite_skips)
            return True
        in_a_row = f" ({self.nonfinite_in_a_row} batches in a row)" if self.nonfinite_in_a_row > 1 else ""
        raise TrainingDiverged(f"training diverged at step {step} (epoch {epoch}): non-finite {what}{in_a_row}; stopped "
                               f"before updating the weights; {self._last_good()}; {_fix_hint(self.method)}.")

    def _last_good(self) -> str:
        cb = self.trainer.checkpoint_callback if self.trainer is not None else None
        last = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written before"

    def _eval_step(self, batch, metric, prefix: str) -> None:
        x, y = batch
        logits = self(x)
        metric(logits.argmax(1), y)
        self.log(f"{prefix}/ce", F.cross_entropy(logits.float(), y), prog_bar=False, sync_dist=True)
        self.log(f"{prefix}/acc", metric, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")

    def configure_optimizers(self):
        o = self.optim
        opt = torch.optim.SGD(
            self.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"], nesterov=o["nesterov"]
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer is not None else 1
        milestones = sorted({max(1, int(round(f * total))) for f in o["milestones"]})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=o["gamma"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # The controller state and the RNG streams travel with the checkpoint so a resumed run
    # continues exactly where the interrupted one stopped.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, t in self.model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:  # e.g. a finite loss with an overflowing gradient: never write such weights over a good checkpoint
            raise TrainingDiverged(f"the weights became non-finite by step {self.global_step} ({len(bad)} tensors, e.g. "
                                   f"{bad[0]}); not saving them; {self._last_good()}; {_fix_hint(self.method)}.")
        checkpoint["psi_controller"] = self.psi.state_dict()
        checkpoint["model_config"] = self.model_config
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "psi_controller" in checkpoint:
            self.psi.load_state_dict(checkpoint["psi_controller"])
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
