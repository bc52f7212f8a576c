"""ImageNet input pipeline images/s per core, its DataLoader scaling, and the imagenet_robust training step.

    .venv/bin/python bench/bench_input_pipeline.py [--parts pipeline loader step] [--root DIR] [--images 1000]
        [--loader-batches 4] [--workers 0 1 2] [--step-batch 8] [--fused] [--json PATH]

Page: docs/imagenet_path.md. --json defaults to docs/imagenet_path/results_<parts>.json (results_pipeline.json,
results_loader.json, results_train_step.json for one part each).

Images: an ImageNet-shaped tree of photo-like JPEGs (scripts/make_imagenet_like.py: 300-500 px, quality 90),
written once to ``--root`` (default logs/bench/imagenet_like, git-ignored) and reused while its arguments match.

``pipeline`` (one process, torch.set_num_threads(1), files in the page cache; images/s of the best of
``--repeats`` passes over the same ``--images`` files, after a warm-up):

- default: a training sample of the datamodule built from conf/data/imagenet.yaml (torchvision ImageFolder
  with datamodules.imagefolder.open_image: PIL decode + copy, then the datamodule's own train transform,
  RandomResizedCrop(224, scale 0.08-1) + flip + ToTensor), with the decode alone and the eval transform
  (Resize 256 + CenterCrop 224) beside it;
- torchvision.io.decode_jpeg on the CPU, then torchvision.transforms.v2 RandomResizedCrop + flip + float
  on the uint8 tensor, with the datamodule's size, scale, ratio and interpolation;
- PIL ``draft()``: the crop is drawn first (the datamodule's RandomResizedCrop.get_params needs only the
  header's size), then the JPEG is decoded at the smallest DCT scale (1/1, 1/2, 1/4, 1/8) that still gives
  the crop at least 224 px on each side, and the crop box is scaled to it;
- torchvision.io.decode_jpeg(device='cuda') (nvJPEG) in batches, when a GPU is present (skipped otherwise).

``loader``: the datamodule's train_dataloader() at conf/data/imagenet.yaml's batch size with
``--workers`` worker processes (0 = in the main process), and the same files and loader settings through a
decode_jpeg dataset with float or uint8 batches: images/s over the first ``--loader-batches`` batches, from
iter() (starting the workers included).

``step``: one training step (forward + backward + SGD) of the imagenet_robust model (conf composed as
train.py does: torchvision ResNet-18, half-Huber ReLU, the paper's penalty by double backprop, adaptive psi)
and of imagenet_standard's, at ``--step-batch`` 224 px images, in the experiment's precision/layout
(bf16-mixed + channels_last) and in fp32 eager (``--fused``: also method.penalty_impl=double_backprop_fused,
which compiles in its warm-up step); median of ``--step-repeats`` after ``--step-warmup``.
bench/bench_train_step.py builds only resnet44 / small_cnn, so the same timing protocol is repeated here for
the experiment's own module. The matrix-multiply/convolution FLOPs of one step are counted with
bench/bench_flops.py's counter (ResNet-50's too, to scale published ResNet-50 GPU figures).

Every row records the 1-minute load average before and after it and the cores other processes used while
it ran (/proc/stat's busy time less this process's own): another job on a 2-core machine halves what a row
measures, and the load average, which lags and counts this benchmark too, does not show that by itself.
Prints markdown tables; --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # make_imagenet_like
sys.path.insert(0, str(ROOT / "bench"))  # bench_flops

from datamodules.imagefolder import open_image  # noqa: E402
from jobs.bench import cpu_name  # noqa: E402

CONF = ROOT / "conf"
DATA_CONF = CONF / "data" / "imagenet.yaml"
CLASSES = 10


def load1() -> float:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2)


class OtherLoad:
    """Cores used by other processes while a block runs: machine busy time (/proc/stat) less this process's own.

    The load average lags by a minute and counts this benchmark too; this says whether another job shared
    the cores during the measurement itself. DataLoader workers count as this process's once joined.
    """

    def __enter__(self) -> "OtherLoad":
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        self.cores = round(max(0.0, other) / max(wall, 1e-9), 2)

    @staticmethod
    def _busy() -> float:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return float("nan")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def ensure_tree(root: Path, *, train_images: int, seed: int = 0) -> dict:
    """An ImageNet-like tree with at least ``train_images`` training files under ``root``; reused if it has them."""
    from make_imagenet_like import make_tree

    from robustx.io.files import atomic_write_json

    per_class = math.ceil(train_images / CLASSES)
    args = {"classes": CLASSES, "train_per_class": per_class, "val_per_class": 2, "seed": seed, "quality": 90}
    marker = root / "tree.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        same = {k: v for k, v in saved.get("args", {}).items() if k != "train_per_class"} == {
            k: v for k, v in args.items() if k != "train_per_class"}
        if same and saved["args"]["train_per_class"] >= per_class:  # the files are deterministic: more is fine
            return saved
    stats = make_tree(root, **args)
    record = {"args": args, **stats}
    atomic_write_json(marker, record, indent=2)
    return record


def datamodule(root: Path, **overrides):
    """The datamodule of conf/data/imagenet.yaml (as train.py instantiates it) on ``root``, set up for fit."""
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(DATA_CONF)
    cfg.root = str(root)
    cfg.num_classes = CLASSES
    for k, v in overrides.items():
        cfg[k] = v
    dm = hydra.utils.instantiate(cfg, _convert_="all")
    dm.setup("fit")
    return dm


def _timed_passes(fn, items: list, *, repeats: int, warmup: int = 10) -> list[float]:
    """Images/s of each of ``repeats`` passes of ``fn`` over ``items`` (after ``warmup`` calls)."""
    for it in items[:warmup]:
        fn(it)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        rates.append(len(items) / (time.perf_counter() - t0))
    return rates


def train_transform_parts(dm):
    """(ConvertMode, RandomResizedCrop, RandomHorizontalFlip) of the datamodule's own train transform."""
    from torchvision import transforms as T

    steps = dm.transforms()[0].transforms
    rrc = next(t for t in steps if isinstance(t, T.RandomResizedCrop))
    flip = next(t for t in steps if isinstance(t, T.RandomHorizontalFlip))
    return steps[0], rrc, flip


def pipeline_paths(dm) -> dict:
    """name -> per-file function returning a (3, 224, 224) float tensor (or the decoded image for decode-only rows)."""
    import torchvision
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import functional as TF
    from torchvision.transforms import v2

    eval_tf = dm.transforms()[1]
    convert, rrc, flip = train_transform_parts(dm)
    size = rrc.size[0]
    by_file = {p: i for i, (p, _) in enumerate(dm.train_set.images.samples)}
    tv_uint8 = v2.Compose([
        v2.RandomResizedCrop(rrc.size, scale=rrc.scale, ratio=rrc.ratio, interpolation=rrc.interpolation, antialias=True),
        v2.RandomHorizontalFlip(flip.p),
    ])
    tv_train = v2.Compose([tv_uint8, v2.ToDtype(torch.float32, scale=True)])
    reduced = {"draft": 0, "files": 0}

    def tv_decode(path):
        return decode_jpeg(torchvision.io.read_file(path), mode=ImageReadMode.RGB)

    def draft_sample(path):
        with Image.open(path) as im:
            w0, h0 = im.size
            top, left, h, w = rrc.get_params(im, list(rrc.scale), list(rrc.ratio))  # the header's size only
            need = size / min(h, w)
            if need < 1:  # the crop has more than 224 px a side: decode at a DCT scale that keeps >= 224
                im.draft("RGB", (math.ceil(w0 * need), math.ceil(h0 * need)))
            fx, fy = im.size[0] / w0, im.size[1] / h0
            reduced["files"] += 1
            reduced["draft"] += int(fx < 1)
            img = convert(im)
            img.load()
        out = TF.resized_crop(img, round(top * fy), round(left * fx), max(1, round(h * fy)), max(1, round(w * fx)),
                              list(rrc.size), interpolation=rrc.interpolation, antialias=True)
        if torch.rand(1) < flip.p:
            out = TF.hflip(out)
        return TF.to_tensor(out)

    return {
        "PIL decode only (open_image)": (open_image, None),
        "default train sample (PIL + RandomResizedCrop + flip + ToTensor)": (lambda p: dm.train_set[by_file[p]], None),
        "default eval transform (PIL + Resize 256 + CenterCrop 224 + ToTensor)": (lambda p: eval_tf(open_image(p)), None),
        "torchvision.io.decode_jpeg (CPU) decode only": (tv_decode, None),
        "torchvision.io.decode_jpeg (CPU) + v2 RandomResizedCrop + flip + float": (lambda p: tv_train(tv_decode(p)), None),
        "torchvision.io.decode_jpeg (CPU) + v2 RandomResizedCrop + flip, uint8 out": (lambda p: tv_uint8(tv_decode(p)), None),
        "PIL draft() + RandomResizedCrop + flip + ToTensor": (draft_sample, reduced),
    }


def gpu_decode(files: list[str], *, batch: int, repeats: int, rrc) -> dict:
    """nvJPEG batch decode + v2 RandomResizedCrop + flip + float on the GPU: images/s, or why it was skipped."""
    if not torch.cuda.is_available():
        return {"skipped": "no GPU here (torch.cuda.is_available() is False)"}
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomResizedCrop(rrc.size, scale=rrc.scale, ratio=rrc.ratio, interpolation=rrc.interpolation,
                                          antialias=True), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32, scale=True)])
    data = [torchvision.io.read_file(f) for f in files]

    def run():
        for i in range(0, len(data), batch):
            imgs = decode_jpeg(data[i : i + batch], mode=ImageReadMode.RGB, device="cuda")
            torch.stack([tf(im) for im in imgs])
        torch.cuda.synchronize()

    run()  # warm-up: nvJPEG handles, kernels
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        rates.append(len(data) / (time.perf_counter() - t0))
    return {"device": torch.cuda.get_device_name(), "batch": batch, "images_per_s": max(rates), "passes": rates}


def bench_pipeline(tree: Path, *, images: int, repeats: int, seed: int) -> dict:
    """Per-core images/s of each decode + augmentation path over the same files."""
    torch.set_num_threads(1)
    dm = datamodule(tree)
    samples = [p for p, _ in dm.train_set.images.samples]
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    files = [samples[i] for i in order[:images]]
    nbytes = sum(Path(f).stat().st_size for f in files)  # also brings the files into the page cache
    for f in files:
        Path(f).read_bytes()
    rows = []
    for name, (fn, counter) in pipeline_paths(dm).items():
        before = load1()
        torch.manual_seed(seed)
        with OtherLoad() as other:
            rates = _timed_passes(fn, files, repeats=repeats)
        row = {"path": name, "images_per_s_per_core": max(rates), "ms_per_image": 1000 / max(rates),
               "passes": rates, "load1_before": before, "load1_after": load1(), "other_cores": other.cores}
        if counter is not None:
            row["draft_reduced_share"] = counter["draft"] / max(1, counter["files"])
        rows.append(row)
    gpu = gpu_decode(files, batch=dm.batch_size, repeats=repeats, rrc=train_transform_parts(dm)[1])
    return {"images": len(files), "mean_kb": nbytes / len(files) / 1000, "threads": torch.get_num_threads(),
            "rows": rows, "gpu_decode": gpu,
            "pillow_simd": "not tried: installing it replaces Pillow in the shared .venv (other work uses it)"}


class DecodeJpegFolder(torch.utils.data.Dataset):
    """The datamodule's training files through torchvision.io.decode_jpeg + v2 RandomResizedCrop + flip.

    Output float in [0, 1] as the datamodule's (a drop-in), or uint8 (``uint8``: 4x less to collate and
    move through shared memory; the model's side would then divide by 255).
    """

    def __init__(self, samples: list, rrc, flip_p: float, *, uint8: bool = False) -> None:
        from torchvision.transforms import v2

        self.samples = samples
        steps = [v2.RandomResizedCrop(rrc.size, scale=rrc.scale, ratio=rrc.ratio, interpolation=rrc.interpolation,
                                      antialias=True), v2.RandomHorizontalFlip(flip_p)]
        self.tf = v2.Compose(steps if uint8 else [*steps, v2.ToDtype(torch.float32, scale=True)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg

        path, label = self.samples[i]
        return self.tf(decode_jpeg(torchvision.io.read_file(path), mode=ImageReadMode.RGB)), label


def bench_loader(tree: Path, *, workers: list[int], batches: int) -> dict:
    """Loader images/s by worker count at the config's batch size: the datamodule's train_dataloader(), and
    the same files, batch size and loader settings through decode_jpeg (float and uint8 batches)."""
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    rows = []
    for pipeline in ("datamodule (PIL)", "decode_jpeg + v2 (float)", "decode_jpeg + v2 (uint8)"):
        for k in workers:
            dm = datamodule(tree, num_workers=k)
            before = load1()
            if pipeline.startswith("datamodule"):
                loader = dm.train_dataloader()
            else:
                _, rrc, flip = train_transform_parts(dm)
                ds = DecodeJpegFolder(dm.train_set.images.samples, rrc, flip.p, uint8="uint8" in pipeline)
                loader = DataLoader(ds, batch_size=dm.batch_size, shuffle=True, num_workers=k, persistent_workers=k > 0,
                                    pin_memory=dm.pin_memory, drop_last=False)
            with OtherLoad() as other:
                t0 = time.perf_counter()
                it = iter(loader)
                n = len(next(it)[0])
                t1 = time.perf_counter()
                for _ in range(batches - 1):
                    n += len(next(it)[0])
                t2 = time.perf_counter()
                del it, loader  # joins the workers, whose CPU time then counts as this process's
            # Over all batches from iter() (starting the workers included): timing only those after the first
            # would credit the batches the other workers prefetched meanwhile (with 2 workers the second batch
            # is ready when the first arrives).
            rows.append({"pipeline": pipeline, "num_workers": k, "batch_size": dm.batch_size, "batches": batches,
                         "first_batch_s": t1 - t0, "images_per_s": n / (t2 - t0), "load1_before": before,
                         "load1_after": load1(), "other_cores": other.cores})
    return {"rows": rows}


def compose(experiment: str, overrides: list[str] = ()):
    """The train.py config of ``+experiment=NAME`` (composed as the entry point does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from jobs.schema import register_schemas

    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return hydra_compose("train", overrides=[f"+experiment={experiment}", *overrides])


def _step_fn(module, *, batch: int, bf16: bool, channels_last: bool, seed: int = 0):
    """One training step of ``module``'s model and method (training_loss + backward + SGD), as a closure."""
    from robustx.training.loss import training_loss

    model = module.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=module.optim["lr"], momentum=module.optim["momentum"],
                          weight_decay=module.optim["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 224, 224, generator=gen)
    y = torch.randint(module.num_classes, (batch,), generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        with ctx:
            out = training_loss(model, x, y, module.method, module.psi)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def count_flops(step) -> float:
    """Matrix-multiply and convolution FLOPs of one call of ``step`` (bench/bench_flops.py's counter)."""
    from bench_flops import FlopCount

    counter = FlopCount()
    with counter:
        step()
    return float(counter.total)


def bench_step(*, batch: int, warmup: int, repeats: int, threads: int, fused: bool, flops: bool) -> dict:
    """Step seconds of the imagenet_robust and imagenet_standard modules, experiment path and fp32 eager."""
    from jobs.train import build_module

    torch.set_num_threads(threads)
    cfgs = {"standard": compose("imagenet_standard"), "robust": compose("imagenet_robust")}
    exp = cfgs["robust"]
    exp_bf16 = str(exp.trainer.precision).startswith("bf16")
    exp_cl = bool(exp.get("channels_last", False))
    exp_path = f"experiment ({exp.trainer.precision}{' + channels_last' if exp_cl else ''})"
    cases = [(m, exp_path, exp_bf16, exp_cl, []) for m in ("standard", "robust")]
    if fused:
        cases.append(("robust (fused)", exp_path, exp_bf16, exp_cl, ["method.penalty_impl=double_backprop_fused"]))
    cases += [(m, "fp32 eager", False, False, []) for m in ("standard", "robust")]
    rows = []
    for method, path, bf16, cl, extra in cases:
        name = method.split(" ")[0]
        cfg = compose(f"imagenet_{name}", extra) if extra else cfgs[name]
        module = build_module(cfg)
        step = _step_fn(module, batch=batch, bf16=bf16, channels_last=cl)
        before = load1()
        times = []
        with OtherLoad() as other:
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                step()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rows.append({"method": method, "path": path, "model": cfg.model.arch, "batch": batch, "seconds": t,
                     "images_per_s": batch / t, "times": times, "penalty_impl": module.method.penalty_impl,
                     "load1_before": before, "load1_after": load1(), "other_cores": other.cores})
    for path in {r["path"] for r in rows}:
        base = next(r["seconds"] for r in rows if r["path"] == path and r["method"] == "standard")
        for r in rows:
            if r["path"] == path:
                r["x_standard_same_path"] = r["seconds"] / base
    counted = {}
    if flops:  # fp32 eager, one step each: the arithmetic ratio a GPU pays where it is compute-bound
        for name in ("standard", "robust"):
            step = _step_fn(build_module(cfgs[name]), batch=batch, bf16=False, channels_last=False)
            counted[f"resnet18 {name}"] = count_flops(step) / batch
        r50 = build_module(compose("imagenet_standard", ["model=resnet50"]))
        counted["resnet50 standard"] = count_flops(_step_fn(r50, batch=2, bf16=False, channels_last=False)) / 2
    return {"threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats, "rows": rows,
            "gflop_per_image_step": {k: v / 1e9 for k, v in counted.items()}}


def print_tables(result: dict) -> None:
    """The results as markdown tables on stdout."""
    m = result["machine"]
    print(f"# input pipeline and step: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, torchvision "
          f"{m['torchvision']}, Pillow {m['pillow']} (libjpeg-turbo {m['libjpeg_turbo']})")
    if "pipeline" in result:
        p = result["pipeline"]
        print(f"\n## per core (1 process, {p['threads']} thread), {p['images']} files, {p['mean_kb']:.0f} KB average")
        print("| path | images/s/core | ms/image | load1 before/after | other processes' cores |")
        print("|---|---|---|---|---|")
        for r in p["rows"]:
            extra = f" (draft reduced {100 * r['draft_reduced_share']:.0f}% of files)" if "draft_reduced_share" in r else ""
            print(f"| {r['path']}{extra} | {r['images_per_s_per_core']:.0f} | {r['ms_per_image']:.2f} | "
                  f"{r['load1_before']} / {r['load1_after']} | {r['other_cores']} |")
        print(f"GPU decode: {p['gpu_decode']}")
    if "loader" in result:
        print("\n## DataLoader (1 main process + num_workers; datamodule train_dataloader, or decode_jpeg)")
        print("| pipeline | num_workers | batch | images/s | first batch s | load1 before/after | other processes' cores |")
        print("|---|---|---|---|---|---|---|")
        for r in result["loader"]["rows"]:
            print(f"| {r['pipeline']} | {r['num_workers']} | {r['batch_size']} | {r['images_per_s']:.0f} | "
                  f"{r['first_batch_s']:.1f} | {r['load1_before']} / {r['load1_after']} | {r['other_cores']} |")
    if "step" in result:
        s = result["step"]
        print(f"\n## training step, {s['threads']} threads, median of {s['repeats']} after {s['warmup']} warm-up")
        print("| model | method | path | batch | s/step | images/s | x standard (same path) | load1 before/after "
              "| other processes' cores |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in s["rows"]:
            print(f"| {r['model']} | {r['method']} | {r['path']} | {r['batch']} | {r['seconds']:.2f} | "
                  f"{r['images_per_s']:.2f} | {r['x_standard_same_path']:.2f} | {r['load1_before']} / {r['load1_after']} "
                  f"| {r['other_cores']} |")
        for k, v in s["gflop_per_image_step"].items():
            print(f"GFLOP per image per training step, {k}: {v:.2f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["pipeline", "loader", "step"], choices=["pipeline", "loader", "step"])
    ap.add_argument("--root", default=str(ROOT / "logs" / "bench" / "imagenet_like"), help="the ImageNet-like tree (made if missing)")
    # 1,000 files (75 MB) do not fit in the CPU caches, as in training (each file read once per epoch);
    # 300 files (22 MB) did, and measured 20% faster.
    ap.add_argument("--images", type=int, default=1000, help="files per pass of the per-core measurement")
    ap.add_argument("--repeats", type=int, default=2, help="passes per path (the best one is reported)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--loader-batches", type=int, default=4, help="batches timed (a multiple of each worker count)")
    ap.add_argument("--step-batch", type=int, default=8)
    ap.add_argument("--step-warmup", type=int, default=1)
    ap.add_argument("--step-repeats", type=int, default=3)
    ap.add_argument("--step-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--fused", action="store_true", help="also time method.penalty_impl=double_backprop_fused (compiles)")
    ap.add_argument("--no-flops", action="store_true", help="skip counting the steps' FLOPs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="numbers as JSON ('' skips; default docs/imagenet_path/results_<parts>.json)")
    args = ap.parse_args(argv)
    if args.json is None:
        names = {"pipeline": "pipeline", "loader": "loader", "step": "train_step"}
        args.json = str(ROOT / "docs" / "imagenet_path" / f"results_{'_'.join(names[p] for p in args.parts)}.json")

    import PIL
    import torchvision
    from omegaconf import OmegaConf
    from PIL import features

    data_cfg = OmegaConf.load(DATA_CONF)
    result: dict = {
        "command": "python bench/bench_input_pipeline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                    "libjpeg_turbo": features.version("libjpeg_turbo"),  # None: Pillow built on plain libjpeg
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "data_config": {"batch_size": int(data_cfg.batch_size), "num_workers": int(data_cfg.num_workers)},
        "load1_start": load1(),
    }
    tree = Path(args.root)
    if {"pipeline", "loader"} & set(args.parts):
        # One tree for both parts (whichever runs first makes it): the loader needs loader_batches full batches.
        need = max(args.images, args.loader_batches * int(data_cfg.batch_size))
        result["tree"] = {"root": str(tree), **ensure_tree(tree, train_images=need, seed=args.seed)}
    if "pipeline" in args.parts:
        result["pipeline"] = bench_pipeline(tree, images=args.images, repeats=args.repeats, seed=args.seed)
    if "loader" in args.parts:
        result["loader"] = bench_loader(tree, workers=args.workers, batches=args.loader_batches)
    if "step" in args.parts:
        result["step"] = bench_step(batch=args.step_batch, warmup=args.step_warmup, repeats=args.step_repeats,
                                    threads=args.step_threads, fused=args.fused, flops=not args.no_flops)
    result["load1_end"] = load1()
    print_tables(result)
    if args.json:
        from robustx.io.files import atomic_write_json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, result, indent=2)
    return result


if __name__ == "__main__":
    main()
