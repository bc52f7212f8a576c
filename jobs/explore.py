"""explore.py's job: a local Gradio app to click through adversarial explanations, baseline maps and the invalidation demo.

:class:`Explorer` holds the model and does the work with the core functions (one image at a
time, returning plain numpy images and dicts), so the app is a thin layer over it and the tests
compare the app's answers with the same calls. The app listens on 127.0.0.1 unless an explicit
``allow_remote=true`` says otherwise; one request runs at a time and the others queue (Gradio's
queue, concurrency 1: the 2-core CPU has no room for two).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jobs.explain import default_class_names, input_format
from jobs.loading import load_classifier

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 2**20  # larger uploads are refused before decoding
MAX_PIXELS = 40_000_000  # PIL's decompression-bomb guard, lowered to what a photo needs
BASELINES = ("gradcam", "integrated_gradients", "saliency", "smoothgrad")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) uint8 for display."""
    x = x.detach().float().clamp(0, 1).cpu()
    if x.size(0) == 1:
        x = x.expand(3, -1, -1)  # (3, H, W)
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)  # (H, W, 3)


def heatmap(m: torch.Tensor) -> np.ndarray:
    """(H, W) map >= 0 -> (H, W, 3) uint8 with matplotlib's inferno, scaled to its maximum."""
    from matplotlib import colormaps

    m = m.detach().float().cpu()
    m = m / m.max().clamp_min(1e-12)
    return (colormaps["inferno"](m.numpy())[..., :3] * 255 + 0.5).astype(np.uint8)


class Explorer:
    """One model and its class names; each method takes one (C, H, W) image in [0, 1]."""

    def __init__(self, ckpt: str | Path, *, dataset=None, device: str = "cpu", compile: bool = False) -> None:
        self.load(ckpt, device=device)
        self.dataset = dataset
        self.compile = compile

    def load(self, ckpt: str | Path, *, device: str = "cpu") -> None:
        """Load a checkpoint (.safetensors, Lightning .ckpt, the authors' .pt through the safe importer)."""
        model, info = load_classifier(Path(ckpt))
        self.model: nn.Module = model.to(device).eval()
        self.device, self.ckpt, self.info = device, Path(ckpt), info
        self.channels, self.size, _ = input_format(model, info)
        with torch.no_grad():
            self.num_classes = int(model(torch.zeros(1, self.channels, *self.size, device=device)).shape[1])
        self.names = default_class_names(self.num_classes, self.channels) or [str(c) for c in range(self.num_classes)]

    # -- inputs --------------------------------------------------------------------------
    def read_file(self, path: str | Path) -> torch.Tensor:
        """An uploaded file -> (C, H, W) model input; ImageLoadError (one line) for non-images and huge files."""
        from PIL import Image

        from robustx.io.images import ImageLoadError, load_image

        path = Path(path)
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise ImageLoadError(f"'{path.name}' is {path.stat().st_size / 2**20:.0f} MB; upload an image under {MAX_UPLOAD_BYTES // 2**20} MB.")
        try:
            with Image.open(path) as img:  # the header only: refuse a pixel bomb before decoding it
                w, h = img.size
        except Exception:
            w = h = 0  # not an image PIL can open: load_image names the problem
        if w * h > MAX_PIXELS:
            raise ImageLoadError(f"'{path.name}' is {w}x{h} pixels; upload an image of at most {MAX_PIXELS:,} pixels.")
        return load_image(path, channels=self.channels, size=self.size)

    def test_image(self, index: int) -> tuple[torch.Tensor, int]:
        """Test image ``index`` of the configured datamodule and its true label."""
        if self.dataset is None:
            raise ValueError("no test images: start explore.py with data=NAME (and data.root=DIR).")
        if not 0 <= int(index) < len(self.dataset):
            raise ValueError(f"test image index must be in [0, {len(self.dataset) - 1}], got {index}.")
        x, y = self.dataset[int(index)]
        return x, int(y)

    # -- views ---------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, *, top: int = 5) -> dict[str, float]:
        """Top classes with their softmax probabilities."""
        with torch.no_grad():
            p = self.model(x[None].to(self.device)).float().softmax(1)[0]  # (num_classes,)
        vals, idx = p.topk(min(top, self.num_classes))
        return {self.names[i]: float(v) for v, i in zip(vals.tolist(), idx.tolist())}

    def predicted_class(self, x: torch.Tensor) -> int:
        with torch.no_grad():
            return int(self.model(x[None].to(self.device)).argmax(1)[0])

    def explanations(self, x: torch.Tensor, *, label: int | None, chosen: str | int | None, rho: float, steps: int) -> dict[str, Any]:
        """AEs toward the true (else predicted) class, the second class, the chosen one and every other class."""
        from robustx.explain.adversarial import adversarial_explanations

        targets: list[Any] = ["true", "second"] + ([chosen] if chosen not in (None, "") else []) + ["all"]
        y = None if label is None else torch.tensor([int(label)], device=self.device)
        res = adversarial_explanations(self.model, x[None].to(self.device), y, targets=targets, rho=float(rho), steps=int(steps),
                                       class_names=self.names, compile=self.compile, all_skips_listed=True)
        items = []
        for k in range(res.targets.size(1)):
            kind = res.kinds[0][k] if res.kinds else None
            if kind is None:
                continue  # a padding slot repeating another column
            t = int(res.targets[0, k])
            items.append({"kind": kind, "target": t, "class": self.names[t], "p_before": float(res.prob_before[0, k]),
                          "p_after": float(res.prob_after[0, k]), "rmse": float(res.rmse[0, k]), "image": res.images[0, k].cpu()})
        return {"items": items, "pred": int(res.pred_before[0])}

    def baselines(self, x: torch.Tensor, cls: int, *, methods: tuple[str, ...] = BASELINES) -> dict[str, torch.Tensor]:
        """The classic attribution maps (H, W) of ``cls``."""
        from robustx.explain.attribution import attribution_maps

        t = torch.tensor([int(cls)], device=self.device)
        return {m: attribution_maps(self.model, x[None].to(self.device), t, method=m)[0].cpu() for m in methods}

    def attack(self, x: torch.Tensor, label: int, *, steps: int = 450) -> dict[str, Any]:
        """The paper's minimal perturbation that flips the class, Grad-CAM before/after and the study's metrics for this image."""
        from robustx.explain.invalidation import invalidation_study

        out = invalidation_study(self.model, x[None].to(self.device), torch.tensor([int(label)], device=self.device),
                                 methods=["gradcam"], attack_steps=int(steps), bootstrap=0, keep_tensors=True)
        if not out["records"]:
            return {"changed": False, "message": f"the model misclassifies this image already (true class {self.names[int(label)]})."}
        rec, ten = out["records"][0], out["tensors"]
        if not rec["changed"]:
            return {"changed": False, "message": f"the search found no perturbation within {steps} steps that flips the class."}
        return {"changed": True, "r": rec["r"], "pred_adv": rec["pred_adv"], "class_adv": self.names[rec["pred_adv"]],
                "metrics": rec["metrics"]["gradcam"], "adversarial": ten["adversarial"][0], "clean": ten["clean"][0],
                "map_clean": ten["maps_clean"]["gradcam"][0], "map_adv": ten["maps_adv"]["gradcam"][0]}


def _save_download(payload: dict[str, Any], images: list[tuple[np.ndarray, str]], stem: str) -> list[str]:
    """A PNG strip of the shown images (captioned) and a JSON of the numbers, in a temp folder served by Gradio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustx.explain.figures import save_png

    folder = Path(tempfile.mkdtemp(prefix="robustx-explore-"))
    fig, axes = plt.subplots(1, max(1, len(images)), figsize=(2 * max(1, len(images)), 2.4), squeeze=False)
    for ax, (img, caption) in zip(axes[0], images):
        ax.imshow(img)
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    png = save_png(fig, folder / f"{stem}.png", dpi=120, close=True)
    js = folder / f"{stem}.json"
    js.write_text(json.dumps(payload, indent=1))
    return [str(png), str(js)]


def build_app(ex: Explorer):
    """The Gradio Blocks app over an :class:`Explorer`."""
    import gradio as gr

    from robustx.io.images import ImageLoadError

    examples = sorted(str(p) for p in EXAMPLES.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    example_choices = [(Path(p).name, p) for p in examples]

    def _image(state):
        if not state:
            raise gr.Error("load an image first (upload one, pick an example or a test image).")
        return torch.tensor(state["x"]), state.get("label")

    def load_upload(path):
        if path is None:
            raise gr.Error("no file uploaded.")
        try:
            x = ex.read_file(path)
        except (ImageLoadError, OSError) as err:
            raise gr.Error(str(err).replace(str(path), Path(path).name)) from None
        return _loaded(x, None, f"uploaded {Path(path).name}")

    def load_example(path):
        if not path:
            raise gr.Error("pick an example.")
        return _loaded(ex.read_file(path), None, f"example {Path(path).name}")

    def load_test(index):
        try:
            x, y = ex.test_image(int(index))
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return _loaded(x, y, f"test image {int(index)} (true class {ex.names[y]})")

    def _loaded(x, label, note):
        state = {"x": x.tolist(), "label": label}
        return state, to_uint8(x), ex.predict(x), note

    def run_explanations(state, chosen, rho, steps, progress=gr.Progress()):
        x, label = _image(state)
        progress(0, desc="adversarial explanations")
        t0 = time.time()
        res = ex.explanations(x, label=label, chosen=chosen or None, rho=rho, steps=steps)
        seconds = time.time() - t0
        gallery = [(to_uint8(it["image"]), f"{it['kind']} {it['class']}: {it['p_before']:.2f} -> {it['p_after']:.2f}")
                   for it in res["items"]]
        payload = {"checkpoint": str(ex.ckpt), "rho": rho, "steps": steps, "seconds": seconds,
                   "items": [{k: v for k, v in it.items() if k != "image"} for it in res["items"]]}
        files = _save_download(payload, [(to_uint8(x), "image")] + gallery, "explanations")
        return gallery, f"{len(gallery)} explanations in {seconds:.2f} s", files

    def run_baselines(state, progress=gr.Progress()):
        x, label = _image(state)
        cls = label if label is not None else ex.predicted_class(x)
        progress(0, desc="attribution maps")
        maps = ex.baselines(x, cls)
        gallery = [(to_uint8(x), f"image ({ex.names[cls]})")] + [(heatmap(m), name) for name, m in maps.items()]
        files = _save_download({"class": ex.names[cls], "methods": list(maps)}, gallery, "baselines")
        return gallery, files

    def run_attack(state, steps, progress=gr.Progress()):
        x, label = _image(state)
        if label is None:
            label = ex.predicted_class(x)  # unknown: the predicted class
        progress(0, desc="minimal perturbation search")
        res = ex.attack(x, label, steps=int(steps))
        if not res["changed"]:
            return [], res["message"], None
        delta = res["adversarial"] - res["clean"]
        magnified = (0.5 + delta / (2 * delta.abs().max().clamp_min(1e-12))).clamp(0, 1)
        gallery = [(to_uint8(res["clean"]), f"clean: {ex.names[label]}"),
                   (to_uint8(res["adversarial"]), f"attacked: {res['class_adv']} (RMSE {res['r']:.4f})"),
                   (to_uint8(magnified), "perturbation (magnified)"),
                   (heatmap(res["map_clean"]), f"Grad-CAM before ({ex.names[label]})"),
                   (heatmap(res["map_adv"]), f"Grad-CAM after ({res['class_adv']})")]
        m = res["metrics"]
        text = (f"RMSE {res['r']:.4f} flips {ex.names[label]} -> {res['class_adv']}. Grad-CAM before vs after: Spearman "
                f"{m['spearman']:.3f}, top-20% overlap {m['top_overlap']:.3f}; share of the perturbation's energy in the clean "
                f"map's top 20%: {m['energy_in_top']:.3f}.")
        files = _save_download({"r": res["r"], "class_adv": res["class_adv"], "metrics": m}, gallery, "attack")
        return gallery, text, files

    def switch_checkpoint(path):
        try:
            ex.load(path.strip(), device=ex.device)
        except Exception as err:  # any unreadable file: a message in the page, the server keeps serving
            raise gr.Error(f"could not load '{path}': {' '.join(str(err).split())[:300]}") from None
        return f"model: {ex.ckpt.name} ({ex.info['format']}, {ex.num_classes} classes, input {ex.channels}x{ex.size[0]}x{ex.size[1]})", None

    with gr.Blocks(title="robustx explorer") as app:
        gr.Markdown("# robustx explorer\nAdversarial explanations: what would this image have to look like to be each class, "
                    "on this network? Beside them the classic maps, and a small attack that flips the class and the map.")
        model_info = gr.Markdown(f"model: {ex.ckpt.name} ({ex.info['format']}, {ex.num_classes} classes, "
                                 f"input {ex.channels}x{ex.size[0]}x{ex.size[1]})")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="upload an image (any size or mode)", file_count="single")
                example = gr.Dropdown(choices=example_choices, label="or a sample image (examples/)", value=examples[0] if examples else None)
                with gr.Row():
                    test_index = gr.Number(value=0, precision=0, label="or test image #", interactive=ex.dataset is not None)
                    test_btn = gr.Button("load test image", interactive=ex.dataset is not None)
                ckpt_box = gr.Textbox(label="another checkpoint (.safetensors, .ckpt, authors' .pt)", placeholder=str(ex.ckpt))
            with gr.Column(scale=1):
                shown = gr.Image(label="input (as the model sees it)", interactive=False, height=224)
                note = gr.Markdown("")
                pred = gr.Label(label="prediction", num_top_classes=5)
        with gr.Tab("Adversarial explanations"):
            with gr.Row():
                chosen = gr.Dropdown(choices=[""] + ex.names, value="", label="also toward this class")
                rho = gr.Slider(0.01, 0.5, value=0.1, step=0.01, label="RMSE budget rho")
                steps = gr.Slider(5, 100, value=35, step=1, label="steps")
            explain_btn = gr.Button("explain", variant="primary", elem_id="explain-btn")
            ae_gallery = gr.Gallery(label="class: p_before -> p_after", columns=6, height="auto", elem_id="ae-gallery")
            ae_note = gr.Markdown("", elem_id="ae-note")
            ae_files = gr.File(label="download (PNG, JSON)", file_count="multiple")
        with gr.Tab("Classic maps"):
            maps_btn = gr.Button("compute maps")
            maps_gallery = gr.Gallery(label="Grad-CAM, integrated gradients, saliency, SmoothGrad", columns=5, height="auto")
            maps_files = gr.File(label="download (PNG, JSON)", file_count="multiple")
        with gr.Tab("Attack"):
            with gr.Row():
                attack_steps = gr.Slider(45, 450, value=112, step=1, label="search steps (paper: 450; 112 answers in seconds)")
                attack_btn = gr.Button("flip the class")
            attack_gallery = gr.Gallery(label="the minimal attack and Grad-CAM before/after", columns=5, height="auto")
            attack_text = gr.Markdown("")
            attack_files = gr.File(label="download (PNG, JSON)", file_count="multiple")

        loaded = [state, shown, pred, note]
        upload.upload(load_upload, upload, loaded, api_name="load_upload")
        example.change(load_example, example, loaded, api_name="load_example")
        if examples:
            app.load(load_example, example, loaded)  # the page opens on the first sample image
        test_btn.click(load_test, test_index, loaded, api_name="load_test")
        ckpt_box.submit(switch_checkpoint, ckpt_box, [model_info, state], api_name="load_checkpoint")
        explain_btn.click(run_explanations, [state, chosen, rho, steps], [ae_gallery, ae_note, ae_files], api_name="explain")
        # dragging a slider re-runs the explanations; a newer request replaces a pending one
        for s in (rho, steps):
            s.release(run_explanations, [state, chosen, rho, steps], [ae_gallery, ae_note, ae_files], trigger_mode="always_last")
        maps_btn.click(run_baselines, state, [maps_gallery, maps_files], api_name="baselines")
        attack_btn.click(run_attack, [state, attack_steps], [attack_gallery, attack_text, attack_files], api_name="attack")
    app.queue(default_concurrency_limit=1)
    return app


def serve(cfg) -> None:
    """Build the Explorer from the config and serve the app until interrupted."""
    import hydra
    from omegaconf import OmegaConf

    host = str(cfg.host)
    if host not in ("127.0.0.1", "localhost") and not cfg.get("allow_remote"):
        raise ValueError(f"host={host} would expose the app to the network; pass allow_remote=true as well if that is what you want.")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    dataset = None
    if cfg.get("data") is not None:
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
        data_cfg["limit_test"] = int(cfg.num_test_images)
        dm = hydra.utils.instantiate(data_cfg, _convert_="all")
        dm.prepare_data()
        dm.setup("test")
        dataset = dm.test_set
    ex = Explorer(hydra.utils.to_absolute_path(str(cfg.ckpt)), dataset=dataset, device=str(cfg.device), compile=bool(cfg.compile))
    if host not in ("127.0.0.1", "localhost"):
        log.warning("serving on %s:%d: anyone who can reach this machine can use the app (allow_remote=true)", host, int(cfg.port))
    warm = time.time()
    x = torch.full((ex.channels, *ex.size), 0.5)
    ex.explanations(x, label=None, chosen=None, rho=0.1, steps=5)  # warm-up: the first call pays one-off costs
    log.info("warm-up %.1f s; open http://%s:%d", time.time() - warm, host, int(cfg.port))
    build_app(ex).launch(server_name=host, server_port=int(cfg.port), show_error=True, quiet=True)
