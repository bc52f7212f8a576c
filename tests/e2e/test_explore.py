"""explore.py's app: its views equal the core functions on the same inputs (Python client), bad input in the page, a real browser."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from jobs.explore import Explorer, build_app
from robustx.io.export import save_model
from robustx.models import SmallCNN

from tests.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
CAT = ROOT / "examples" / "images" / "cat.jpg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    if os.environ.get("ROBUSTX_EXPLORE_CKPT"):  # e.g. the robust reference network, for the README's screenshot
        return Explorer(os.environ["ROBUSTX_EXPLORE_CKPT"])
    torch.manual_seed(0)
    cfg = {"_target_": "robustx.models.SmallCNN", "in_channels": 3, "channels": [8, 8, 8], "hidden": 16,
           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = save_model(SmallCNN(in_channels=3, channels=(8, 8, 8), hidden=16, mean=(0.5,) * 3, std=(0.25,) * 3), tmp_path_factory.mktemp("m") / "m.safetensors",
                      model_config=cfg)
    return Explorer(path)


@pytest.fixture(scope="module")
def served(explorer):
    app = build_app(explorer)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


def test_views_are_the_core_functions(explorer):
    from robustx.explain.adversarial import adversarial_explanations
    from robustx.explain.attribution import attribution_maps

    x = explorer.read_file(CAT)
    assert x.shape == (3, 32, 32)
    res = explorer.explanations(x, label=3, chosen="dog", rho=0.1, steps=10)
    core = adversarial_explanations(explorer.model, x[None], torch.tensor([3]), targets=["true", "second", "dog", "all"], rho=0.1,
                                    steps=10, class_names=explorer.names, all_skips_listed=True)
    kept = [k for k in range(core.targets.size(1)) if core.kinds[0][k] is not None]
    assert [it["target"] for it in res["items"]] == [int(core.targets[0, k]) for k in kept]
    assert all(torch.equal(it["image"], core.images[0, k]) for it, k in zip(res["items"], kept))
    assert {it["kind"] for it in res["items"]} >= {"true", "second", "class"}
    assert {it["target"] for it in res["items"]} == set(range(10))  # every class, the listed ones once more at most
    maps = explorer.baselines(x, 3)
    assert torch.allclose(maps["saliency"], attribution_maps(explorer.model, x[None], torch.tensor([3]), method="saliency")[0])


def test_app_through_the_python_client(served, explorer, tmp_path):
    from gradio_client import Client, handle_file

    _, url = served
    client = Client(url, verbose=False)
    shown, pred, note = client.predict(str(CAT), api_name="/load_example")  # the loaded image stays in the session's state
    assert "cat.jpg" in note and set(pred["confidences"][0]) >= {"label", "confidence"}
    x = explorer.read_file(CAT)
    top = explorer.predict(x)
    assert pred["label"] == next(iter(top))
    gallery, text, files = client.predict("dog", 0.1, 10, api_name="/explain")
    core = explorer.explanations(x, label=None, chosen="dog", rho=0.1, steps=10)
    assert [g["caption"] for g in gallery] == [f"{it['kind']} {it['class']}: {it['p_before']:.2f} -> {it['p_after']:.2f}"
                                               for it in core["items"]]
    assert sorted(Path(f).suffix for f in files) == [".json", ".png"]
    maps_gallery, maps_files = client.predict(api_name="/baselines")
    assert [g["caption"] for g in maps_gallery][1:] == ["gradcam", "integrated_gradients", "saliency", "smoothgrad"]
    attack_gallery, attack_text, _ = client.predict(45, api_name="/attack")
    res = explorer.attack(x, explorer.predicted_class(x), steps=45)
    if res["changed"]:
        assert f"RMSE {res['r']:.4f} flips" in attack_text and len(attack_gallery) == 5
        assert f"Spearman {res['metrics']['spearman']:.3f}" in attack_text
    else:
        assert attack_text == res["message"] and attack_gallery == []
    # a non-image upload: a message in the page, and the server keeps serving
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(Exception, match="notes.txt"):
        client.predict(handle_file(str(bad)), api_name="/load_upload")
    from PIL import Image

    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 6000)).save(huge)
    with pytest.raises(Exception, match="8000x6000 pixels"):
        client.predict(handle_file(str(huge)), api_name="/load_upload")
    with pytest.raises(Exception, match="could not load"):
        client.predict(str(tmp_path / "missing.safetensors"), api_name="/load_checkpoint")
    assert client.predict(str(CAT), api_name="/load_example")[2] == note  # still serving


def test_remote_binding_needs_an_explicit_option(tmp_path):
    from omegaconf import OmegaConf

    from jobs.explore import serve

    with pytest.raises(ValueError, match="allow_remote=true"):
        serve(OmegaConf.create({"host": "0.0.0.0", "port": 7860, "ckpt": str(tmp_path / "m.safetensors")}))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (scripts/setup.sh installs it when run as root)")
def test_page_in_a_real_browser(served, tmp_path):
    pytest.importorskip("playwright", reason="needs the playwright package (pyproject dependency)")
    from playwright.sync_api import sync_playwright

    _, url = served
    shot = tmp_path / "explorer.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.wait_for_selector("text=robustx explorer")
        page.wait_for_function("document.body.innerText.includes('example cat.jpg')", timeout=60_000)
        page.click("#explain-btn")
        page.wait_for_function("document.querySelector('#ae-note') && document.querySelector('#ae-note').innerText.includes('explanations in')",
                               timeout=120_000)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("ROBUSTX_SCREENSHOT"):  # where the README's picture comes from (docs/explorer/)
        shutil.copy(shot, os.environ["ROBUSTX_SCREENSHOT"])
