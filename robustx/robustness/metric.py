"""A torchmetrics Metric accumulating per-image minimal perturbations and computing both ARAs."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from robustx.robustness.ara import summarize

__all__ = ["ARAMetric"]


class ARAMetric(Metric):
    """Collects r_i for the Attack and BTR criteria; ``compute`` returns both ARAs with CIs.

    States are concatenated across processes (``dist_reduce_fx="cat"``), so under DDP each rank
    updates with its shard of the images and every rank computes the ARA of all of them.

    Args:
        num_classes: C (chance level 1/C).
        bootstrap: bootstrap resamples for the 95% CIs (0 disables them).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, *, bootstrap: int = 1000, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"ARAMetric needs num_classes >= 2, got {num_classes}.")
        self.num_classes, self.bootstrap = num_classes, bootstrap
        self.add_state("r_attack", default=[], dist_reduce_fx="cat")
        self.add_state("r_btr", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, r_attack: torch.Tensor, r_btr: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Add a batch: (B,) minimal RMSEs for each criterion and, optionally, (B,) image ids."""
        if r_attack.shape != r_btr.shape:
            raise ValueError(f"r_attack and r_btr must have the same shape, got {tuple(r_attack.shape)} and {tuple(r_btr.shape)}.")
        self.r_attack.append(r_attack.detach().double().flatten())
        self.r_btr.append(r_btr.detach().double().flatten())
        idx = torch.arange(r_attack.numel(), device=r_attack.device) if index is None else index.flatten()
        self.index.append(idx.long())

    def _gathered(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if isinstance(value, list):
            return torch.cat(value) if value else torch.zeros(0, dtype=torch.float64)
        return value

    def compute(self) -> dict[str, float]:
        idx = self._gathered("index")
        order = torch.argsort(idx, stable=True)  # same order whatever the sharding
        out: dict[str, float] = {}
        for mode in ("attack", "btr"):
            r = self._gathered(f"r_{mode}")[order].cpu()
            for k, v in summarize(r, self.num_classes, bootstrap=self.bootstrap).items():
                out[f"{mode}/{k}"] = v
        return out

    def values(self, mode: str) -> torch.Tensor:
        """All r_i of one criterion, ordered by image id, gathered from every DDP rank.

        A collective call under DDP: every rank must make it (``compute`` syncs only for its own
        duration, so the states here are each rank's shard until synced again).
        """
        with self.sync_context(should_sync=not self._is_synced, should_unsync=not self._is_synced):
            idx = self._gathered("index")
            return self._gathered(f"r_{mode}")[torch.argsort(idx, stable=True)].cpu()
