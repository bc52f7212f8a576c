"""AdversarialExplanations: PNG grids of adversarial explanations of fixed validation images during training."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor

from robustx.utils import model_mode

log = logging.getLogger(__name__)

DEFAULT_BASELINES = ("gradcam", "integrated_gradients", "saliency", "smoothgrad", "lime")


class AdversarialExplanations(pl.Callback):
    """Every N epochs (and at the end), draw adversarial explanations of fixed validation images.

    The images are the first ``num_images`` of the datamodule's ``val_set`` (else of the
    validation dataloader), taken once and reused, so the grids of successive epochs show how
    the network's explanations of the same images evolve. Each call writes
    ``<output_dir>/explanations/epoch_XXX.png`` (``final.png`` at the end of training, unless
    the last periodic call already covered that step) with, per image, ``input | AE toward
    each target`` captioned ``AE -> class`` over ``p p_before -> p_after`` and a row of
    baseline maps for the true class with a colour bar (see
    :func:`robustx.explain.figures.explanation_grid`). ``all`` adds only the classes the other targets
    do not name, so ``[true, second, all]`` shows each class once. With a WandbLogger the grid is
    logged as a ``wandb.Image`` under ``explanations/grid``; every logger gets the call's cost
    as ``explanations/seconds``, which is also logged as a line. Only global rank 0 works
    (under DDP the other ranks skip the call; the model is used unwrapped, so no collective
    runs).

    Args:
        every_n_epochs: period in epochs (0: only at the end of training).
        num_images: validation images to explain.
        targets: AE targets (``true`` = the label, ``second``, ``all`` = the classes not listed otherwise, class names/indices).
        rho: RMSE budget of the AEs (paper: 0.1).
        steps: engine steps (paper: 35).
        overshoot: engine path length in units of rho (paper: 5).
        baselines: attribution methods for the second row (``[]``: none); see robustx.explain.attribution.METHODS.
        bf16: run the AE engine under bf16 autocast.
        compile: run the engine's passes through torch.compile (compiled on the first call,
            reused by later ones as the weights change).
        on_train_end: also draw the grid at the end of training.
        use_labels: ``true`` means the label (else the predicted class).
        output_dir: folder for ``explanations/`` (default: trainer.default_root_dir, the run folder).
        dpi: PNG resolution.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int = 5,
        num_images: int = 8,
        targets: Sequence[str | int] = ("true", "second", "all"),
        rho: float = 0.1,
        steps: int = 35,
        overshoot: float = 5.0,
        baselines: Sequence[str] = DEFAULT_BASELINES,
        bf16: bool = False,
        compile: bool = False,
        on_train_end: bool = True,
        use_labels: bool = True,
        output_dir: str | None = None,
        dpi: int = 100,
    ) -> None:
        super().__init__()
        from robustx.explain.attribution import METHODS

        if every_n_epochs < 0:
            raise ValueError(f"AdversarialExplanations: every_n_epochs must be >= 0 (0: only at the end), got {every_n_epochs}.")
        if num_images <= 0:
            raise ValueError(f"AdversarialExplanations: num_images must be > 0, got {num_images}.")
        if not rho > 0:
            raise ValueError(f"AdversarialExplanations: rho must be > 0 (paper: 0.1), got {rho}.")
        if steps < 1:
            raise ValueError(f"AdversarialExplanations: steps must be >= 1 (paper: 35), got {steps}.")
        targets = ["true" if t is True else t for t in ([targets] if isinstance(targets, (str, int)) else list(targets))]
        if not targets:
            raise ValueError("AdversarialExplanations: targets is empty; use e.g. [true, second, all].")
        bad = [b for b in baselines if b not in METHODS]
        if bad:
            raise ValueError(f"AdversarialExplanations: unknown baseline(s) {bad}; choose from {list(METHODS)} or [].")
        self.every_n_epochs, self.num_images, self.targets = int(every_n_epochs), int(num_images), targets
        self.rho, self.steps, self.overshoot = float(rho), int(steps), float(overshoot)
        self.baselines, self.bf16, self.final = list(baselines), bool(bf16), bool(on_train_end)
        self.compile = bool(compile)
        self.use_labels, self.output_dir, self.dpi = bool(use_labels), output_dir, int(dpi)
        self._batch: tuple[Tensor, Tensor] | None = None
        self._last_step: int | None = None
        self.history: list[dict[str, Any]] = []

    # -- hooks -----------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, tag=f"epoch_{trainer.current_epoch:03d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final and self._last_step != trainer.global_step:
            self._run(trainer, pl_module, tag="final")

    # -- work ------------------------------------------------------------------------------
    def _fixed_images(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
        """The first num_images validation images and labels -> ((N, C, H, W), (N,)), cached on CPU."""
        if self._batch is not None:
            return self._batch
        dm = trainer.datamodule
        ds = getattr(dm, "val_set", None) if dm is not None else None
        xs: list[Tensor] = []
        ys: list[int] = []
        if ds is not None:
            for i in range(min(self.num_images, len(ds))):
                x, y = ds[i][:2]
                xs.append(torch.as_tensor(x))
                ys.append(int(y))
            x_all, y_all = (torch.stack(xs), torch.tensor(ys)) if xs else (None, None)  # (N, C, H, W), (N,)
        else:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            if loader is None:
                raise ValueError("AdversarialExplanations needs validation data: a datamodule with val_set or a val dataloader.")
            bx, by = [], []
            for batch in loader:
                bx.append(batch[0].detach().cpu())
                by.append(torch.as_tensor(batch[1]).detach().cpu())
                if sum(len(b) for b in bx) >= self.num_images:
                    break
            x_all = torch.cat(bx)[: self.num_images] if bx else None  # (N, C, H, W)
            y_all = torch.cat(by)[: self.num_images].long() if by else None  # (N,)
        if x_all is None or len(x_all) == 0:
            raise ValueError("AdversarialExplanations found no validation images; check the datamodule's val split.")
        self._batch = (x_all.float(), y_all)
        return self._batch

    def _class_names(self, trainer: pl.Trainer, num_classes: int) -> list[str] | None:
        names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
        return [str(n) for n in names] if names is not None and len(names) == num_classes else None

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, tag: str) -> None:
        if not trainer.is_global_zero:
            return
        from robustx.explain.attribution import attribution_maps
        from robustx.explain.adversarial import adversarial_explanations
        from robustx.explain.figures import explanation_grid, save_png

        start = time.time()
        self._last_step = trainer.global_step
        x, y = self._fixed_images(trainer)
        device = pl_module.device
        model = getattr(pl_module, "model", pl_module)
        channels_last = bool(getattr(getattr(pl_module, "hparams", None), "channels_last", False))
        x, y = x.to(device), y.to(device)
        with model_mode(model, train=False), torch.inference_mode(False), torch.enable_grad():
            with torch.no_grad():
                probs = model(x).float().softmax(1)  # (N, num_classes)
            num_classes = probs.size(1)
            names = self._class_names(trainer, num_classes)
            labels = y if self.use_labels else None
            res = adversarial_explanations(
                model, x, labels, targets=self.targets, rho=self.rho, steps=self.steps, overshoot=self.overshoot,
                autocast_dtype=torch.bfloat16 if self.bf16 else None, channels_last=channels_last, compile=self.compile,
                class_names=names, all_skips_listed=True,
            )
            kinds = res.kinds  # (N, K); the non-"all" columns sit at the same index in every row
            explained = y if self.use_labels else res.pred_before  # (N,)
            maps: dict[str, Tensor] = {}
            if self.baselines:
                if "true" in kinds[0]:
                    j = kinds[0].index("true")
                    maps["ae"] = (res.images[:, j] - x).float().pow(2).mean(1).sqrt()  # (N, H, W)
                for m in self.baselines:
                    maps[m] = attribution_maps(model, x, explained, method=m, rho=self.rho, ae_steps=self.steps)  # (N, H, W)
        fig = explanation_grid(
            x, res.images, res.targets, res.prob_before, res.prob_after, class_names=names, kinds=kinds,
            preds=res.pred_before, pred_probs=probs.gather(1, res.pred_before[:, None])[:, 0],
            labels=y if self.use_labels else None, baselines=maps or None, baseline_targets=explained,
            title=f"epoch {trainer.current_epoch}, step {trainer.global_step} ({tag}): adversarial explanations, rho={self.rho:g}",
        )
        out_dir = Path(self.output_dir or trainer.default_root_dir) / "explanations"
        png = save_png(fig, out_dir / f"{tag}.png", dpi=self.dpi)
        seconds = time.time() - start
        mean_after = float(res.prob_after.mean())
        log.info("adversarial explanations %s: %d images x %d targets%s in %.1f s (%.2f s/image) -> %s", tag, x.size(0),
                 len(kinds[0]), f" + {len(self.baselines)} baselines" if self.baselines else "", seconds,
                 seconds / x.size(0), png)
        self.history.append({"tag": tag, "epoch": trainer.current_epoch, "step": trainer.global_step, "png": str(png),
                             "seconds": seconds, "mean_prob_after": mean_after})
        self._log(trainer, png, tag, seconds)

    def _log(self, trainer: pl.Trainer, png: Path, tag: str, seconds: float) -> None:
        from pytorch_lightning.loggers import WandbLogger

        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                import wandb

                lg.experiment.log({
                    "explanations/grid": wandb.Image(str(png), caption=f"{tag} (step {trainer.global_step})"),
                    "explanations/seconds": seconds,
                    "trainer/global_step": trainer.global_step,
                })
            else:
                lg.log_metrics({"explanations/seconds": seconds}, step=trainer.global_step)
