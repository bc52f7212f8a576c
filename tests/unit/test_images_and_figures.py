"""robustx.io.images (modes, sizes, failures) and the figures: explanation grid, invalidation grid, eval's ARA curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import PNG_MAGIC, colorbars

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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


# -- robustx.explain.figures, robustx.explain.study_figures, jobs.evaluate.plot_curves ---------------


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
    bars = colorbars(fig)  # one colour bar per map row, [0, 1]
    assert len(bars) == b and all(a.get_xlim() == (0.0, 1.0) for a in bars)
    png = save_png(fig, tmp_path / "sub" / "grid.png", dpi=50)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no temporary file left
    with Image.open(png) as im:
        assert min(im.size) > 100
    # grayscale, no baselines: no colour bar
    fig = explanation_grid(x[:, :1], ae[:, :, :1], t, pb, pa)
    assert len(fig.axes) == b * (1 + k) and not colorbars(fig)
    with pytest.raises(ValueError, match="must be \\(B, K\\)"):
        explanation_grid(x, ae, t[:, :2], pb, pa)
    # per-image kinds (AEResult.kinds): a padding slot (None) is drawn blank, without a caption
    fig = explanation_grid(x, ae, t, pb, pa, class_names=["cat", "dog"], kinds=[["true", "class", "all", "all"],
                                                                                 ["true", "class", "all", None]])
    assert sum(ax.get_title().startswith("AE -> ") for ax in fig.axes) == 2 * k - 1
    with pytest.raises(ValueError, match="kinds per image"):
        explanation_grid(x, ae, t, pb, pa, kinds=[["true"] * k])


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
    assert len(colorbars(fig)) == 2


def test_curve_titles_name_the_protocol_and_labels_the_output_names(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from jobs.evaluate import plot_curves

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    res = [{"checkpoint": f"/x/{d}/model.safetensors", "name": f"{d}_model", "num_classes": 10, "settings": {"protocol": "cheap"},
            "attack": {"r": [0.0, 0.01, 0.02], "ara": 0.01}, "btr": {"r": [0.0, 0.02, 0.03], "ara": 0.02}} for d in ("runA", "runB")]
    plot_curves(res, tmp_path / "curves.png", ["attack", "btr"])
    (fig,) = figs
    assert [ax.get_title() for ax in fig.axes] == ["Attack (cheap search)", "BTR (cheap search)"]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:2] == ["runA_model (ARA 0.0100)", "runB_model (ARA 0.0100)"]
