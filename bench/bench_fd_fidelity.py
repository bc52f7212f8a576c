"""How close the finite-difference penalty gradient is to the exact (double-backprop) one.

    .venv/bin/python bench/bench_fd_fidelity.py [--models resnet44 small_cnn] [--images 64]

For each model (resnet44: the authors' robust network in train mode on CIFAR-10 JPEG test images
when ../shared is there; small_cnn: the demo's HHReLU network, random init, on Fashion-MNIST-sized
random images), the exact parameter gradient of the penalty (robustx.training.penalty.input_gradient_penalty,
fp32, double backprop) against finite_difference_penalty's surrogate gradient for several probe
sizes h, in fp32 and under bf16 autocast (with channels_last for resnet44): cosine similarity and
norm ratio. Same output selection (same generator seed) for every row.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustx.models import SmallCNN, resnet44  # noqa: E402
from robustx.training.penalty import finite_difference_penalty, input_gradient_penalty  # noqa: E402


def load(name: str, n: int):
    torch.manual_seed(0)
    if name == "resnet44":
        ckpt = ROOT.parent / "shared" / "reference-checkpoints" / "resnet44-robust.pt"
        tar = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
        if ckpt.is_file():
            from robustx.io.legacy import import_reference_checkpoint

            model, _ = import_reference_checkpoint(ckpt)
            what = "resnet44-robust.pt"
        else:
            model, what = resnet44(activation="hhrelu"), "resnet44 random init"
        if tar.is_dir():
            from datamodules import CIFAR10DataModule

            dm = CIFAR10DataModule(root=str(tar), limit_test=n)
            dm.prepare_data()
            dm.setup("test")
            x = torch.stack([dm.test_set[i][0] for i in range(n)])
            y = torch.tensor([int(dm.test_set[i][1]) for i in range(n)])
            return model, x, y, what + ", CIFAR-10 JPEG test images"
        return model, torch.rand(n, 3, 32, 32), torch.randint(10, (n,)), what + ", random images"
    model = SmallCNN(activation="hhrelu", channels=(16, 32, 32), hidden=64)
    return model, torch.rand(n, 1, 28, 28), torch.randint(10, (n,)), "small_cnn (demo widths) random init, random images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet44", "small_cnn"])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--h", nargs="+", type=float, default=[1e-4, 2e-4, 5e-4, 2e-3, 1e-2])
    args = ap.parse_args()
    print(f"# finite-difference penalty gradient vs double backprop; {args.images} images, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.machine()}")
    print("| model | path | h | cosine to exact | norm ratio |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model, x, y, what = load(name, args.images)
        model.train()
        print(f"| {name}: {what} | | | | |")
        params = [p for p in model.parameters() if p.requires_grad]

        def flat(gs):
            return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, params)])

        _, pen = input_gradient_penalty(model, x, y, generator=torch.Generator().manual_seed(1))
        exact = flat(torch.autograd.grad(pen, params, allow_unused=True))
        paths = [("fp32", False, False), ("bf16-mixed", True, False)]
        if name == "resnet44":
            paths.append(("bf16-mixed + channels_last", True, True))
        for path, bf16, cl in paths:
            m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            xx = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            for h in args.h:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    _, _, sur = finite_difference_penalty(m, xx, y, h=h, generator=torch.Generator().manual_seed(1))
                fd = flat(torch.autograd.grad(sur, params, allow_unused=True))
                cos = torch.nn.functional.cosine_similarity(exact, fd, dim=0).item()
                print(f"| {name} | {path} | {h:g} | {cos:.4f} | {(fd.norm() / exact.norm()).item():.3f} |", flush=True)
        model.to(memory_format=torch.contiguous_format)


if __name__ == "__main__":
    main()
