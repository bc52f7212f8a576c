"""explain.py end to end (tiny exported models, image files of other sizes and modes), robustx.io.images and robustx.explain.figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustx.io.export import save_model
from robustx.models import SmallCNN

from tests.paths import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    env = {**os.environ, "ROBUSTX_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(ROOT / "explain.py"), "threads=1", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


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


# -- robustx.io.images ------------------------------------------------------------------------


def test_image_io_modes_sizes_and_failures(tmp_path, caplog):
    from robustx.io.images import ImageLoadError, load_image, load_images

    rng = np.random.default_rng(1)
    paths = {
        "rgb": tmp_path / "rgb.png",
        "pal": tmp_path / "pal.png",
        "la": tmp_path / "la.png",
        "bw": tmp_path / "bw.png",
        "cmyk": tmp_path / "cmyk.jpg",
    }
    rgb = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(paths["rgb"])
    Image.fromarray(rgb).convert("P").save(paths["pal"])
    Image.fromarray(rng.integers(0, 256, (20, 20, 2), dtype=np.uint8), "LA").save(paths["la"])
    Image.fromarray(rng.integers(0, 2, (20, 20), dtype=np.uint8) * 255).convert("1").save(paths["bw"])
    Image.fromarray(rgb).convert("CMYK").save(paths["cmyk"])
    for ch in (1, 3):
        for p in paths.values():
            x = load_image(p, channels=ch, size=(16, 24))
            assert x.shape == (ch, 16, 24) and x.dtype == torch.float32
            assert 0 <= float(x.min()) and float(x.max()) <= 1
    # RGB -> gray uses the luma weights; gray -> RGB repeats the channel
    x3 = load_image(paths["rgb"], channels=3, size=(30, 60))
    x1 = load_image(paths["rgb"], channels=1, size=(30, 60))
    assert torch.allclose(x3, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert torch.allclose(x1[0], 0.299 * x3[0] + 0.587 * x3[1] + 0.114 * x3[2], atol=1e-6)
    g = load_image(paths["la"], channels=3, size=20)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    # 16-bit keeps its precision
    a16 = np.array([[0, 65535], [32768, 1]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert torch.allclose(load_image(tmp_path / "g16.png", channels=1, size=2)[0], torch.from_numpy(a16 / 65535.0).float())
    # one log line per image, saying what was done
    caplog.set_level("INFO", logger="robustx.io.images")
    load_image(paths["rgb"], channels=1, size=16)
    (rec,) = [r for r in caplog.records if r.name == "robustx.io.images"]
    assert "rgb.png: 60x30 RGB, RGB->gray, resized 60x30->32x16, center-cropped to 16x16" in rec.getMessage()

    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    bad = {
        tmp_path / "missing.png": "file not found",
        tmp_path / "bad.png": "bad.png:",
        tmp_path: "is a directory",
    }
    for p, msg in bad.items():
        with pytest.raises(ImageLoadError, match=msg) as info:
            load_image(p, channels=3, size=8)
        assert "\n" not in str(info.value) and str(p) in str(info.value)
    with pytest.raises(ImageLoadError, match="1 or 3 channels"):
        load_image(paths["rgb"], channels=4, size=8)
    res = load_images([paths["rgb"], tmp_path / "missing.png", paths["pal"], tmp_path / "bad.png"], channels=3, size=8)
    assert res.images.shape == (2, 3, 8, 8) and res.paths == [paths["rgb"], paths["pal"]]
    assert [p for p, _ in res.failures] == [tmp_path / "missing.png", tmp_path / "bad.png"]
    empty = load_images([tmp_path / "missing.png"], channels=1, size=8)
    assert empty.images.shape == (0, 1, 8, 8) and len(empty.failures) == 1


# -- robustx.explain.figures -------------------------------------------------------------------------


def _colorbars(fig) -> list:
    """Colour-bar axes of a figure (inset ones included), found by their label."""
    from robustx.explain.figures import MAP_COLORBAR_LABEL

    axes = [a for ax in fig.axes for a in (ax, *ax.child_axes)]
    return [a for a in axes if MAP_COLORBAR_LABEL in (a.get_xlabel(), a.get_ylabel())]


def test_explanation_grid_is_pure_and_written_atomically(tmp_path):
    import matplotlib.pyplot as plt

    from robustx.explain.adversarial import resolve_target_columns
    from robustx.explain.figures import explanation_grid, save_png

    b, k = 2, 4
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, 8, 8, generator=g)
    ae = (x[:, None] + 0.3 * torch.randn(b, k, 3, 8, 8, generator=g))  # (B, K, C, H, W), outside [0, 1] on purpose
    t = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1]])
    pb, pa = torch.rand(b, k, generator=g), torch.rand(b, k, generator=g)
    kinds = resolve_target_columns(torch.zeros(1, 2), None, ["true", "second", "all"])[1][0]
    assert kinds == ["true", "second", "all", "all"]
    figs_before = plt.get_fignums()
    fig = explanation_grid(x, ae, t, pb, pa, class_names=["cat", "dog"], kinds=kinds, preds=t[:, 0], labels=t[:, 0],
                           baselines={"gradcam": torch.rand(b, 8, 8, generator=g), "lime": torch.zeros(b, 8, 8)},
                           baseline_targets=t[:, 0], row_titles=["a", "b"], title="test")
    assert plt.get_fignums() == figs_before  # nothing registered with pyplot
    titles = [ax.get_title() for ax in fig.axes]
    assert f"AE -> cat (true)\np {float(pb[0, 0]):.2f} -> {float(pa[0, 0]):.2f}" in titles
    assert f"AE -> dog (second)\np {float(pb[0, 1]):.2f} -> {float(pa[0, 1]):.2f}" in titles
    # every "all" column names its class
    assert f"AE -> cat\np {float(pb[0, 2]):.2f} -> {float(pa[0, 2]):.2f}" in titles
    assert f"AE -> dog\np {float(pb[1, 3]):.2f} -> {float(pa[1, 3]):.2f}" in titles
    assert not any("all" in tt for tt in titles)
    assert "Grad-CAM" in titles and "LIME" in titles
    bars = _colorbars(fig)  # one colour bar per map row, [0, 1]
    assert len(bars) == b and all(a.get_xlim() == (0.0, 1.0) for a in bars)
    png = save_png(fig, tmp_path / "sub" / "grid.png", dpi=50)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no temporary file left
    with Image.open(png) as im:
        assert min(im.size) > 100
    # grayscale, no baselines: no colour bar
    fig = explanation_grid(x[:, :1], ae[:, :, :1], t, pb, pa)
    assert len(fig.axes) == b * (1 + k) and not _colorbars(fig)
    with pytest.raises(ValueError, match="must be \\(B, K\\)"):
        explanation_grid(x, ae, t[:, :2], pb, pa)
    # per-image kinds (AEResult.kinds): a padding slot (None) is drawn blank, without a caption
    fig = explanation_grid(x, ae, t, pb, pa, class_names=["cat", "dog"], kinds=[["true", "class", "all", "all"],
                                                                                 ["true", "class", "all", None]])
    assert sum(ax.get_title().startswith("AE -> ") for ax in fig.axes) == 2 * k - 1
    with pytest.raises(ValueError, match="kinds per image"):
        explanation_grid(x, ae, t, pb, pa, kinds=[["true"] * k])


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
    assert len(_colorbars(fig)) == 1


def test_invalidation_grid_has_a_colorbar_per_row(tmp_path, monkeypatch):
    import robustx.explain.study_figures as sf

    figs = []
    save = sf.save_figure
    monkeypatch.setattr(sf, "save_figure", lambda fig, png, **k: figs.append(fig) or save(fig, png, **k))
    g = torch.Generator().manual_seed(0)
    maps = lambda: {m: torch.rand(2, 8, 8, generator=g) for m in ("ae", "gradcam")}  # noqa: E731
    png = sf.invalidation_grid(tmp_path / "maps.png", clean=torch.rand(2, 3, 8, 8, generator=g),
                               adversarial=torch.rand(2, 3, 8, 8, generator=g), maps_clean=maps(), maps_adv=maps(),
                               labels=[0, 1], preds=[1, 0], r=[0.01, 0.02], class_names=["cat", "dog"], title="t")
    assert png.read_bytes()[:8] == PNG_MAGIC
    (fig,) = figs
    assert len(_colorbars(fig)) == 2
