"""The ImageNet card command, ``train.py +experiment=imagenet_robust``, on a tiny ImageNet-shaped tree of
photo-sized JPEGs (scripts/make_imagenet_like.py): a few CPU steps of the experiment's own ResNet-18 at
224 px, the ARA callback, the export, and the exported model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import run_script

CLASSES = 4
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 2
STEPS = 2  # batches of 4 out of 24 training images: a robust ResNet-18 step at 224 px is seconds on 2 cores


def make_tree(tmp_path: Path) -> Path:
    """4 classes x (6 train + 2 val) photo-like JPEGs of 300-500 px, through the script's CLI."""
    root = tmp_path / "imagenet_like"
    run_script("scripts/make_imagenet_like.py", tmp_path, "--root", str(root), "--classes", str(CLASSES),
               "--train-per-class", str(TRAIN_PER_CLASS), "--val-per-class", str(VAL_PER_CLASS), "--seed", "0")
    return root


def card_overrides(root: Path) -> list[str]:
    """The card command made a few CPU steps: small batches, a cheap final ARA on 4 images, no AutoAttack."""
    return [
        "+experiment=imagenet_robust", f"data.root={root}", f"data.num_classes={CLASSES}",
        "trainer=cpu", "trainer.precision=32-true", "trainer.max_epochs=1", f"trainer.limit_train_batches={STEPS}",
        "trainer.enable_progress_bar=false", "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0",
        # ln(4) = 1.39: the default target 1.5 would warn that psi grows without bound with 4 classes.
        "method.l_target=1.0", "logger=csv", "callbacks=ara", "callbacks.ara_evaluation.every_n_epochs=0",
        "callbacks.ara_evaluation.final_num_images=4", "callbacks.ara_evaluation.final_protocol=cheap",
        "callbacks.ara_evaluation.final_steps=6", "callbacks.ara_evaluation.batch_size=4",
        "callbacks.ara_evaluation.bootstrap=20", "callbacks.ara_evaluation.fixed_radius=none",
    ]


def only_run(tmp_path: Path) -> Path:
    """The one run folder train.py made under ``tmp_path``."""
    (run,) = sorted(p.parent for p in (tmp_path / "logs").glob("train/runs/**/.hydra"))
    return run


def check_run(run: Path, *, steps: int, ara_files: tuple[str, ...]) -> None:
    """metrics.json counts the steps; the ARA files are there; the export loads and gives (N, 4) logits at 224 px."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["experiment"] == "imagenet_robust" and metrics["method"]["name"] == "robust"
    assert metrics["global_steps"] == steps, metrics
    for name in ara_files:
        record = json.loads((run / name).read_text())
        assert record["num_images"] == 4 and len(record["r_attack"]) == 4, record.keys()
    from robustx.io.export import load_model

    model, meta = load_model(run / "model.safetensors")
    assert meta["model_config"]["arch"] == "resnet18" and meta["model_config"]["activation"] == "hhrelu"
    with torch.no_grad():
        logits = model.eval()(torch.rand(3, 3, 224, 224))
    assert logits.shape == (3, CLASSES) and torch.isfinite(logits).all()


def test_make_imagenet_like_tree_is_imagenet_shaped_and_deterministic(tmp_path):
    """wnid folders, ImageNet file names, photo sizes, 4:2:0 JPEGs; the same bytes for the same seed."""
    root = make_tree(tmp_path)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert classes[0] == "n01440764" and len(classes) == CLASSES
    assert classes == sorted(p.name for p in (root / "val").iterdir())
    assert all(c.startswith("n") and len(c) == 9 and c[1:].isdigit() for c in classes)
    train = sorted((root / "train").glob("*/*.JPEG"))
    val = sorted((root / "val").glob("*/*.JPEG"))
    assert len(train) == CLASSES * TRAIN_PER_CLASS and len(val) == CLASSES * VAL_PER_CLASS
    assert train[0].name.startswith(f"{classes[0]}_") and val[0].name.startswith("ILSVRC2012_val_")
    for path in train[:8]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and 300 <= max(im.size) <= 500, (path, im.size)
            assert im.layer[0][1:3] == (2, 2)  # luma sampled 2x2 against chroma: 4:2:0, as most ImageNet files
            # Not flat: a photo-like file decodes to varied pixels at several kilobytes.
            assert path.stat().st_size > 10_000 and max(hi - lo for lo, hi in im.getextrema()) > 100
    other = tmp_path / "again"
    run_script("scripts/make_imagenet_like.py", tmp_path, "--root", str(other), "--classes", str(CLASSES),
               "--train-per-class", "2", "--val-per-class", "0", "--seed", "0")
    for path in sorted((other / "train").glob("*/*.JPEG")):
        assert path.read_bytes() == (root / "train" / path.parent.name / path.name).read_bytes()


def test_imagenet_robust_card_command_trains_evaluates_and_exports(tmp_path):
    """A few fp32 CPU steps of the card command: metrics.json, ara_final.json, model.safetensors at 224 px."""
    root = make_tree(tmp_path)
    # channels_last=false: on this CPU autograd's double backward is 1.3-2.5x slower in NHWC (the first
    # step most of all, docs/train_step_speed.md); the slow test below keeps the experiment's layout.
    run_script("train.py", tmp_path, *card_overrides(root), "channels_last=false", env={"WANDB_SILENT": "true"})
    check_run(only_run(tmp_path), steps=STEPS, ara_files=("ara_final.json",))


@pytest.mark.slow
def test_imagenet_robust_card_command_bf16_with_workers(tmp_path):
    """As the card runs it: bf16-mixed, channels_last, DataLoader workers (the datasets pickle), the periodic ARA too.

    Slow only because it is a second whole run (about 19 s on a quiet 2-core machine, 3-4x that under load).
    """
    root = make_tree(tmp_path)
    run_script("train.py", tmp_path, *card_overrides(root), "trainer.precision=bf16-mixed", "data.num_workers=2",
               "callbacks.ara_evaluation.every_n_epochs=1", "callbacks.ara_evaluation.num_images=4",
               "callbacks.ara_evaluation.steps=6", env={"WANDB_SILENT": "true"})
    check_run(only_run(tmp_path), steps=STEPS, ara_files=("ara_epoch000.json", "ara_final.json"))
