"""ARAEvaluation: the Accuracy-Robustness Area during training (cheap, every N epochs) and at the end (full protocol)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from robustx.robustness.ara import PROTOCOLS, ara_curve, evaluate_batch
from robustx.robustness.fixed_radius import VERSIONS, check_threat_model, fixed_radius_attack
from robustx.robustness.metric import ARAMetric
from robustx.io.files import atomic_write
from robustx.utils import model_mode

log = logging.getLogger(__name__)


def _search(protocol: str, steps: int | None, eps: float | None, momentum: float | None, *, key: str) -> dict[str, Any]:
    """A protocol's search settings with the given overrides, validated (one-line errors naming the key)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"ARAEvaluation: unknown {key}protocol '{protocol}'; choose one of {sorted(PROTOCOLS)}.")
    p = PROTOCOLS[protocol]
    out = {"steps": int(p["steps"] if steps is None else steps), "eps": float(p["eps"] if eps is None else eps),
           "momentum": float(p["momentum"] if momentum is None else momentum)}
    if out["steps"] <= 0 or out["eps"] <= 0:
        raise ValueError(f"ARAEvaluation: {key}steps and {key}eps must be > 0, got {out['steps']} and {out['eps']}.")
    return out


class ARAEvaluation(pl.Callback):
    """Log val/ara_attack, val/ara_btr (+ 95% CIs, median r, curves) on a fixed validation subset.

    Every ``every_n_epochs`` epochs it runs the minimal-perturbation search with cheap settings
    on ``num_images`` images; at the end of training it runs ``final`` settings (the paper's
    protocol by default) on ``final_num_images``. Images are sharded across DDP ranks and the
    r_i gathered by :class:`robustx.robustness.metric.ARAMetric`. Seconds per call are logged
    (``val/ara_seconds``) and printed in the log.

    Args:
        every_n_epochs: period (0 disables the periodic evaluation).
        num_images: periodic evaluation images.
        protocol: periodic search protocol (a name of :data:`robustx.robustness.ara.PROTOCOLS`);
            steps, eps, momentum: override its values (None: the protocol's).
        final: run the final evaluation at the end of training.
        final_num_images, final_protocol, final_steps, final_eps, final_momentum: the same for the
            final evaluation (the paper's: 1000 images, the paper protocol).
        batch_size: images per attack batch.
        bf16: run the attack under bf16 autocast (faster on CPUs with AVX-512 BF16 and on GPUs).
        compile: run the attack's passes through torch.compile (compiled at the first call, reused).
        bootstrap: bootstrap resamples for the CIs.
        clip: keep perturbed images in [0, 1].
        output_dir: where ``ara_epoch<k>.json`` / ``ara_final.json`` go (default: trainer.default_root_dir, the run folder).
        fixed_radius: AutoAttack preset of the fixed-radius accuracy on the same images
            (``quick``: APGD-CE + APGD-T; ``standard``: + FAB-T + Square; ``none``), logged as
            ``val/robust_acc_<norm>_<eps>`` (``final/...`` at the end).
        threat_models: ``[{"norm": "L2" | "Linf", "eps": radius}]``; None: the datamodule's.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int = 5,
        num_images: int = 100,
        protocol: str = "cheap",
        steps: int | None = None,
        eps: float | None = None,
        momentum: float | None = None,
        final: bool = True,
        final_num_images: int = 1000,
        final_protocol: str = "paper",
        final_steps: int | None = None,
        final_eps: float | None = None,
        final_momentum: float | None = None,
        batch_size: int = 100,
        bf16: bool = False,
        compile: bool = False,
        bootstrap: int = 1000,
        clip: bool = False,
        output_dir: str | None = None,
        fixed_radius: str = "quick",
        threat_models: list[dict] | None = None,
    ) -> None:
        super().__init__()
        if every_n_epochs < 0 or num_images <= 0 or final_num_images <= 0 or batch_size <= 0:
            raise ValueError("ARAEvaluation: every_n_epochs >= 0 and num_images, final_num_images, batch_size > 0 are required.")
        self.every_n_epochs = every_n_epochs
        self.periodic = {"num_images": num_images, **_search(protocol, steps, eps, momentum, key="")}
        self.final_settings = {"num_images": final_num_images, **_search(final_protocol, final_steps, final_eps, final_momentum, key="final_")}
        self.final, self.batch_size, self.bf16, self.compile = final, batch_size, bf16, bool(compile)
        self.bootstrap, self.clip, self.output_dir = bootstrap, clip, output_dir
        self.history: list[dict[str, Any]] = []
        if fixed_radius not in (*VERSIONS, "none"):
            raise ValueError(f"ARAEvaluation: fixed_radius must be one of {sorted(VERSIONS)} or none, got '{fixed_radius}'.")
        self.fixed_radius = fixed_radius
        self.threat_models = [dict(t) for t in threat_models] if threat_models is not None else None
        for t in self.threat_models or []:
            check_threat_model(t["norm"], float(t["eps"]), "quick")

    # -- hooks -----------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, self.periodic, tag=f"epoch{trainer.current_epoch:03d}", log_to_module=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final:
            self._run(trainer, pl_module, self.final_settings, tag="final", log_to_module=False)

    # -- work ------------------------------------------------------------------------------
    def _images(self, trainer: pl.Trainer, n: int):
        dm = trainer.datamodule
        ds = getattr(dm, "val_set", None) if dm is not None else None
        if ds is None:
            raise ValueError("ARAEvaluation needs a datamodule with a val_set (call setup('fit') first).")
        n = min(n, len(ds))
        ids = list(range(trainer.global_rank, n, trainer.world_size))  # shard across ranks
        return ds, ids, n

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, s: dict[str, Any], *, tag: str, log_to_module: bool) -> None:
        start = time.time()
        ds, ids, n = self._images(trainer, s["num_images"])
        model = pl_module.model
        metric = ARAMetric(int(getattr(pl_module, "num_classes", 0) or trainer.datamodule.num_classes), bootstrap=self.bootstrap).to(pl_module.device)
        found = {"attack": 0, "btr": 0}
        late = {"attack": 0, "btr": 0}
        tms = [] if self.fixed_radius == "none" else [
            {**t, "label": f"{t['norm']}_{float(t['eps']):.4g}"}
            for t in (self.threat_models if self.threat_models is not None else getattr(trainer.datamodule, "threat_models", []))]
        robust_count = {t["label"]: 0 for t in tms}
        with model_mode(model, train=False), torch.inference_mode(False), torch.enable_grad():
            for i in range(0, len(ids), self.batch_size):
                chunk = ids[i : i + self.batch_size]
                x = torch.stack([ds[j][0] for j in chunk]).to(pl_module.device)
                y = torch.tensor([int(ds[j][1]) for j in chunk], device=pl_module.device)
                if getattr(pl_module.hparams, "channels_last", False):
                    x = x.contiguous(memory_format=torch.channels_last)
                out = evaluate_batch(
                    model, x, y, steps=s["steps"], eps=s["eps"], momentum=s["momentum"], clip=self.clip,
                    autocast_dtype=torch.bfloat16 if self.bf16 else None, compile=self.compile,
                )
                metric.update(out["r_attack"], out["r_btr"], torch.tensor(chunk, device=pl_module.device))
                for t in tms:
                    fr = fixed_radius_attack(model, x.contiguous(), y, norm=t["norm"], eps=float(t["eps"]), version=self.fixed_radius)
                    robust_count[t["label"]] += int(fr["robust"].sum())
                for mode in found:
                    found[mode] += int(out[f"found_{mode}"].sum())
                    late[mode] += int((out[f"first_fail_step_{mode}"] > s["steps"] // 2).sum() + (~out[f"found_{mode}"]).sum())
        res = metric.compute()
        r_all = {mode: metric.values(mode) for mode in ("attack", "btr")}  # collective: on every rank
        seconds = time.time() - start
        values = {
            "val/ara_attack": res["attack/ara"],
            "val/ara_btr": res["btr/ara"],
            "val/ara_attack_ci_low": res["attack/ara_ci_low"],
            "val/ara_attack_ci_high": res["attack/ara_ci_high"],
            "val/ara_btr_ci_low": res["btr/ara_ci_low"],
            "val/ara_btr_ci_high": res["btr/ara_ci_high"],
            "val/median_r_attack": res["attack/median_r"],
            "val/median_r_btr": res["btr/median_r"],
            "val/ara_seconds": seconds,
        }
        if tms:  # robust counts summed over DDP ranks (each attacked its own shard of the images)
            counts = torch.tensor([robust_count[t["label"]] for t in tms], dtype=torch.float64, device=pl_module.device)
            counts = trainer.strategy.reduce(counts, reduce_op="sum") if trainer.world_size > 1 else counts
            for t, c in zip(tms, counts.tolist()):
                values[f"val/robust_acc_{t['label']}"] = c / n
            log.info("ARA %s: robust accuracy (AutoAttack %s) %s", tag, self.fixed_radius,
                     ", ".join(f"{t['label']} {values['val/robust_acc_' + t['label']]:.4f}" for t in tms))
        prefix = "final/" if tag == "final" else ""
        log.info(
            "ARA %s (%d images, %d steps): attack %.5f [%.5f, %.5f], btr %.5f [%.5f, %.5f]; %.1f s (%.2f s/image)",
            tag, n, s["steps"], res["attack/ara"], res["attack/ara_ci_low"], res["attack/ara_ci_high"],
            res["btr/ara"], res["btr/ara_ci_low"], res["btr/ara_ci_high"], seconds, seconds / max(1, len(ids)),
        )
        for mode in late:
            if late[mode]:
                log.warning(
                    "ARA %s: %d image(s) did not fail the %s criterion within %d steps; their r_i are lower bounds "
                    "and the ARA is not representative (raise the steps or eps).", tag, late[mode], mode, s["steps"] // 2,
                )
        if log_to_module:
            for k, v in values.items():
                pl_module.log(k, v, sync_dist=False, rank_zero_only=True)
        elif trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics({prefix + k: v for k, v in values.items()}, step=trainer.global_step)
        if trainer.is_global_zero:
            self._log_curves(trainer, r_all, tag)
            record = {"tag": tag, "epoch": trainer.current_epoch, "settings": s, "num_images": n, **res, "seconds": seconds,
                      "r_attack": r_all["attack"].tolist(), "r_btr": r_all["btr"].tolist(),
                      "robust_acc": {k.removeprefix("val/robust_acc_"): v for k, v in values.items() if k.startswith("val/robust_acc_")},
                      "fixed_radius": self.fixed_radius}
            self.history.append({k: v for k, v in record.items() if not k.startswith("r_")})
            out_dir = Path(self.output_dir or trainer.default_root_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(out_dir / f"ara_{tag}.json", json.dumps(record))

    def _log_curves(self, trainer: pl.Trainer, r_all: dict[str, torch.Tensor], tag: str) -> None:
        try:
            from pytorch_lightning.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for lg in trainer.loggers:
            if not isinstance(lg, WandbLogger):
                continue
            import wandb

            rows = []
            for mode in ("attack", "btr"):
                radii, acc = ara_curve(r_all[mode])
                rows += [[mode, float(a), float(b)] for a, b in zip(radii, acc)]
            table = wandb.Table(data=rows, columns=["criterion", "rmse", "fraction_above"])
            lg.experiment.log(
                {
                    f"ara_curve/{tag}": wandb.plot.line(table, "rmse", "fraction_above", stroke="criterion", title=f"Accuracy-robustness curve ({tag})"),
                    f"ara_table/{tag}": table,
                    "trainer/global_step": trainer.global_step,
                }
            )
