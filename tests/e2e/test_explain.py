"""explain.py end to end (tiny exported models, image files of other sizes and modes); the image reader and the
figures alone: tests/unit/test_images_and_figures.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustx.io.export import save_model
from robustx.models import SmallCNN

from tests.helpers import PNG_MAGIC, colorbars, run_script
from tests.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _export(path: Path, *, in_channels: int) -> Path:
    torch.manual_seed(0)
    kw = {"in_channels": in_channels, "channels": [4, 4, 4], "hidden": 8, "mean": [0.5] * in_channels, "std": [0.25] * in_channels}
    return save_model(SmallCNN(**kw), path, model_config={"_target_": "robustx.models.SmallCNN", **kw})


def _images(d: Path) -> dict[str, Path]:
    """Good files of other sizes/modes plus a truncated JPEG and a text file named .png."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        "rgba": d / "rgba_45x37.png",
        "jpeg": d / "photo_20x50.jpg",
        "gray16": d / "gray16_40.png",
        "truncated": d / "truncated.jpg",
        "text": d / "notes.png",
    }
    Image.fromarray(rng.integers(0, 256, (37, 45, 4), dtype=np.uint8), "RGBA").save(files["rgba"])
    Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)).save(files["jpeg"], quality=90)
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(files["gray16"])
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"].write_text("this is not an image\n")
    return files


def run_explain(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_script("explain.py", tmp_path, "threads=1", *overrides, env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
                      check=False, timeout=300)


def test_explain_rgb_model_on_files_of_any_size_with_bad_files(tmp_path):
    ckpt = _export(tmp_path / "rgb.safetensors", in_channels=3)
    f = _images(tmp_path / "imgs")
    order = ["rgba", "truncated", "jpeg", "text", "gray16"]
    listing = ",".join(str(f[k]) for k in order)
    proc = run_explain(tmp_path, f"ckpt={ckpt}", f"images=[{listing}]", "steps=3", "hydra.run.dir=out")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]  # some files failed ...
    assert "Traceback" not in out
    # ... each with one error line naming the file, the problem and the fix
    errors = [line for line in out.splitlines() if "ImageLoadError" in line]
    assert len(errors) == 2, errors
    assert any("truncated.jpg" in e and "truncated or corrupt" in e and "re-export" in e for e in errors), errors
    assert any("notes.png" in e and "not an image file" in e and "pass a PNG" in e for e in errors), errors
    assert "2 of 5 image(s) could not be read" in out
    # ... and the good ones still get a PNG grid and a JSON each
    run = tmp_path / "out"
    for key in ("rgba", "jpeg", "gray16"):
        stem = f[key].stem
        png, js = run / f"{stem}.png", run / f"{stem}.json"
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as im:
            im.verify()
        rec = json.loads(js.read_text())
        assert rec["class_names"][0] == "airplane" and len(rec["class_names"]) == 10  # CIFAR-10 default names
        assert rec["input_shape"] == [3, 32, 32]
        kinds = [t["kind"] for t in rec["targets"]]
        assert kinds == ["true", "second"] + ["all"] * 8  # "all": the 8 classes not already shown
        assert rec["targets"][0]["class"] == rec["pred_before"]  # no label: "true" is the predicted class
        classes = [t["class"] for t in rec["targets"]]
        assert sorted(classes) == list(range(10))  # every class once
        assert classes[2:] == sorted(set(range(10)) - set(classes[:2]))
        for t in rec["targets"]:
            assert 0 <= t["prob_before"] <= 1 and 0 <= t["prob_after"] <= 1
            assert 0 < t["rmse"] <= 0.1 * (1 + 1e-3)
        assert rec["settings"]["rho"] == 0.1 and rec["settings"]["steps"] == 3
        assert rec["settings"]["baselines"] == ["gradcam", "integrated_gradients", "saliency", "smoothgrad", "lime"]
        assert rec["seconds"]["total"] > 0 and set(rec["seconds"]["baselines"]) == set(rec["settings"]["baselines"])
    assert "gray->RGB" in json.loads((run / "gray16_40.json").read_text())["preprocessing"]
    assert "alpha over white" in json.loads((run / "rgba_45x37.json").read_text())["preprocessing"]
    assert not (run / "truncated.png").exists() and not (run / "notes.json").exists()
    assert "s/image" in out


def _explain_in_process(tmp_path: Path, monkeypatch, *overrides: str) -> int:
    """Run explain.py's Hydra main in this process (no interpreter start-up) -> exit code; logging restored afterwards."""
    import logging
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUSTX_ROOT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [str(ROOT / "explain.py"), *overrides])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        runpy.run_path(str(ROOT / "explain.py"), run_name="__main__")
        return 0
    except SystemExit as err:
        return int(err.code or 0)
    finally:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        GlobalHydra.instance().clear()


def test_explain_gray_model_labels_named_targets_out_dir(tmp_path, monkeypatch):
    ckpt = _export(tmp_path / "gray.safetensors", in_channels=1)
    f = _images(tmp_path / "imgs")
    code = _explain_in_process(tmp_path, monkeypatch, f"ckpt={ckpt}", f"images=[{f['jpeg']}]", "labels=[trouser]",
                               "targets=[true,bag]", "baselines=[]", "steps=3", "rho=0.05", "out_dir=results_here")
    assert code == 0
    rec = json.loads((tmp_path / "results_here" / "photo_20x50.json").read_text())
    assert rec["input_shape"] == [1, 28, 28] and "RGB->gray" in rec["preprocessing"]
    assert rec["class_names"][:2] == ["t-shirt", "trouser"]  # Fashion-MNIST default names
    assert rec["label"] == 1 and rec["label_name"] == "trouser"
    assert [(t["kind"], t["name"]) for t in rec["targets"]] == [("true", "trouser"), ("class", "bag")]
    assert all(t["rmse"] <= 0.05 * (1 + 1e-3) for t in rec["targets"])
    assert rec["seconds"]["baselines"] == {}
    assert (tmp_path / "results_here" / "photo_20x50.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "override, message",
    [("rho=0", "rho must be > 0"), ("targets=[true,zebra]", "Unknown target 'zebra'")],
    ids=["rho", "class-name"],
)
def test_explain_user_errors_exit_2(tmp_path, monkeypatch, capsys, override, message):
    ckpt = _export(tmp_path / "rgb.safetensors", in_channels=3)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    code = _explain_in_process(tmp_path, monkeypatch, f"ckpt={ckpt}", f"images=[{img}]", override, "hydra.run.dir=out")
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 2, out[-3000:]
    # Nothing was written: the failed run leaves no run folder behind.
    assert not (tmp_path / "out").exists()
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if "ValueError" in ln]
    assert lines and all(message in ln for ln in lines), lines


def test_explain_default_targets_each_class_once_captioned_with_colorbar(tmp_path, monkeypatch):
    """targets=[true, second, all]: one AE per class (engine rows), JSON rows and captions name every class once."""
    import robustx.explain.adversarial as ex
    import robustx.explain.figures as figures

    rows, figs = [], []
    engine, grid = ex.engine_attack, figures.explanation_grid
    monkeypatch.setattr(ex, "engine_attack", lambda m, imgs, *a, **k: rows.append(imgs.size(0)) or engine(m, imgs, *a, **k))
    monkeypatch.setattr(figures, "explanation_grid", lambda *a, **k: figs.append(grid(*a, **k)) or figs[-1])
    ckpt = _export(tmp_path / "rgb.safetensors", in_channels=3)
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    code = _explain_in_process(tmp_path, monkeypatch, f"ckpt={ckpt}", f"images=[{img}]", "steps=3", "baselines=[saliency]",
                               "out_dir=out")
    assert code == 0
    assert rows == [10]  # one engine row per class: true and second are not explained again
    rec = json.loads((tmp_path / "out" / "a.json").read_text())
    targets = rec["targets"]
    assert [t["kind"] for t in targets] == ["true", "second"] + ["all"] * 8
    assert sorted(t["class"] for t in targets) == list(range(10))
    assert all(t["name"] == rec["class_names"][t["class"]] for t in targets)
    (fig,) = figs
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("AE -> ")]
    tags = {"true": " (true)", "second": " (second)", "all": ""}
    assert titles == [f"AE -> {t['name']}{tags[t['kind']]}\np {t['prob_before']:.2f} -> {t['prob_after']:.2f}" for t in targets]
    assert len(colorbars(fig)) == 1
