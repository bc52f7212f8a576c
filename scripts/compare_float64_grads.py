"""Compare the float64 penalty training gradient on a device with the CPU's, per parameter.

    PYTHONPATH=. python scripts/compare_float64_grads.py [--device cuda]

For the SmallCNN with the half-Huber ReLU and the input-gradient penalty (method "robust"), in
train and eval mode, prints for every parameter the largest |gradient| on the CPU with autograd
and the largest difference to: the CPU's fused double backprop, the device's autograd, the
device's fused double backprop and (CUDA) both with cuDNN off. Differences near float64 rounding
(about 1e-15 of the largest gradient) say the paths compute the same thing; larger ones say some
step ran at lower precision. It found that the cross-entropy was taken of ``logits.float()``,
rounding float64 logits to float32 (logs/stop16_float64_grads_*.log in docs/gpu/gpu_check_h200/runs.tar.gz).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustx.models import SmallCNN  # noqa: E402
from robustx.training.loss import MethodConfig, training_loss  # noqa: E402


def grads(impl: str, device: torch.device, mode: str) -> tuple[dict[str, torch.Tensor], float]:
    """(parameter name -> float64 gradient on the CPU, loss) for one penalty implementation."""
    torch.manual_seed(0)
    model = SmallCNN(activation="hhrelu").double()
    model = (model.train() if mode == "train" else model.eval()).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(10, (8,), generator=g)
    cfg = MethodConfig.from_dict({"name": "robust", "activation": "hhrelu", "penalty": True, "penalty_impl": impl})
    out = training_loss(model, x.to(device), y.to(device), cfg, cfg.make_psi(), generator=torch.Generator().manual_seed(3))
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, [t.cpu() for t in torch.autograd.grad(out.loss, list(model.parameters()))])), out.loss.item()


def report(tag: str, ref: tuple, other: tuple) -> None:
    (g_ref, l_ref), (g, l) = ref, other
    print(f"== {tag}: loss {l_ref:.17g} vs {l:.17g}")
    for name in g_ref:
        diff = (g[name] - g_ref[name]).abs().max()
        top = g_ref[name].abs().max()
        print(f"   {name:28s} max|g| {top:.3e} max abs diff {diff:.3e} max diff/max|g| {diff / top:.3e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(ap.parse_args().device)
    for mode in ("train", "eval"):
        ref = grads("double_backprop", torch.device("cpu"), mode)
        report(f"{mode}: CPU fused vs CPU autograd", ref, grads("double_backprop_fused", torch.device("cpu"), mode))
        report(f"{mode}: {dev} autograd vs CPU autograd", ref, grads("double_backprop", dev, mode))
        report(f"{mode}: {dev} fused vs CPU autograd", ref, grads("double_backprop_fused", dev, mode))
        if dev.type == "cuda":
            torch.backends.cudnn.enabled = False
            report(f"{mode}: {dev} fused, cuDNN off, vs CPU autograd", ref, grads("double_backprop_fused", dev, mode))
            report(f"{mode}: {dev} autograd, cuDNN off, vs CPU autograd", ref, grads("double_backprop", dev, mode))
            torch.backends.cudnn.enabled = True


if __name__ == "__main__":
    main()
