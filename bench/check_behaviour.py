"""Record, then check, the outputs that must not change when code moves (issue 18: behaviour unchanged).

    .venv/bin/python bench/check_behaviour.py record docs/refactor/behaviour_reference   # before
    .venv/bin/python bench/check_behaviour.py check  docs/refactor/behaviour_reference   # after: exit 1 on any difference

On fixed inputs it computes
  1. ``eval.py`` on the authors' ResNet-44 "robust" network, 20 CIFAR-10 test images, paper protocol,
     fp32 path (no bf16, no channels_last, no compile, no cross-check, no cache): every r_i of both
     criteria, the accuracy and the ARAs;
  2. adversarial explanations of examples/images/cat.jpg toward every class on the same network;
  3. a 1-epoch demo run (``train.py +experiment=demo`` on a small subset, one thread): metrics.json;
  4. that run's exported model.safetensors: its tensors and its logits on fixed random images,
and compares them bit for bit (``torch.equal``; floats in JSON with ``==``). Timings are not compared.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CKPT = SHARED / "reference-checkpoints" / "resnet44-robust.pt"
CIFAR = SHARED / "datasets" / "cifar10-jpeg"
_VOLATILE = ("time", "seconds", "sec", "date", "version", "path", "dir", "host", "torch", "python", "started", "lr-")


def _attr(candidates: list[tuple[str, str]]):
    """The first importable ``module.name`` of ``candidates``: the same check runs before and after a move."""
    for mod, name in candidates:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {candidates} importable")


def _cli(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def _numbers(obj, prefix=""):
    """Flatten JSON to {key: value}, dropping timing/provenance keys."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if any(t in str(k).lower() for t in _VOLATILE):
                continue
            out.update(_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and obj and all(isinstance(v, (int, float)) or v is None for v in obj):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float, bool)) or obj is None:
        out[prefix.rstrip(".")] = obj
    return out


def compute(work: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    numbers: dict = {}
    tensors: dict[str, torch.Tensor] = {}

    # 1. ARA r_i through the eval CLI (fp32 path).
    ev = work / "eval"
    _cli(["eval.py", f"ckpt={CKPT}", "data=cifar10", f"data.root={CIFAR}", "ara.num_images=20", "ara.batch_size=20",
          "ara.bf16=false", "ara.channels_last=false", "ara.compile=false", "ara.bootstrap=100", "ara.threads=1",
          "cross_check.attacks=[]", "cache=false", f"hydra.run.dir={ev}"], ev)
    (res,) = [p for p in ev.glob("*.json") if p.name != "summary.json"][:1] or [None]
    if res is None:
        raise RuntimeError(f"eval wrote no JSON in {ev}: {sorted(p.name for p in ev.iterdir())}")
    numbers["eval"] = _numbers(json.loads(res.read_text()))

    # 2. AEs of a fixed image on the same network.
    import_ref = _attr([("robustx.io.legacy", "import_reference_checkpoint"), ("robustx.io.legacy", "import_reference_checkpoint")])
    load_image = _attr([("robustx.io.image_io", "load_image"), ("robustx.io.images", "load_image")])
    aes = _attr([("robustx.explain.adversarial", "adversarial_explanations"),
                 ("robustx.explain.adversarial", "adversarial_explanations")])
    model, _ = import_ref(CKPT)
    x = load_image(ROOT / "examples" / "images" / "cat.jpg", channels=3, size=32)[None]  # (1, 3, 32, 32)
    res_ae = aes(model, x, targets="all")
    tensors["ae.images"] = res_ae.images.detach().contiguous()
    for k in ("rmse", "probs", "logits"):
        v = getattr(res_ae, k, None)
        if isinstance(v, torch.Tensor):
            tensors[f"ae.{k}"] = v.detach().contiguous()

    # 3. a 1-epoch demo run.
    tr = work / "train"
    _cli(["train.py", "+experiment=demo", "trainer.max_epochs=1", "data.limit_train=1024", "data.limit_val=256",
          "data.limit_test=256", "logger=none", f"hydra.run.dir={tr}"], tr)
    numbers["train"] = _numbers(json.loads((tr / "metrics.json").read_text()))

    # 4. the exported model: tensors and logits.
    from safetensors.torch import load_file

    for k, v in load_file(str(tr / "model.safetensors")).items():
        tensors[f"export.{k}"] = v.contiguous()
    load_model = _attr([("robustx.io.export", "load_model"), ("robustx.io.export", "load_model")])
    net, _ = load_model(tr / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tensors["export.logits"] = net(torch.rand(16, 1, 28, 28, generator=g)).contiguous()
    return numbers, tensors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["record", "check"])
    p.add_argument("reference", type=Path, help="folder for numbers.json + tensors.safetensors")
    a = p.parse_args(argv)
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        numbers, tensors = compute(Path(tmp))
    if a.action == "record":
        a.reference.mkdir(parents=True, exist_ok=True)
        (a.reference / "numbers.json").write_text(json.dumps(numbers, indent=1, sort_keys=True))
        save_file(tensors, str(a.reference / "tensors.safetensors"))
        print(f"recorded {sum(len(v) for v in numbers.values())} numbers and {len(tensors)} tensors in {a.reference}")
        return 0
    ref_n = json.loads((a.reference / "numbers.json").read_text())
    ref_t = load_file(str(a.reference / "tensors.safetensors"))
    bad = []
    for part in sorted(set(ref_n) | set(numbers)):
        r, n = ref_n.get(part, {}), numbers.get(part, {})
        for k in sorted(set(r) | set(n)):
            if r.get(k, "<missing>") != n.get(k, "<missing>"):
                bad.append(f"{part}.{k}: reference {str(r.get(k, '<missing>'))[:80]} now {str(n.get(k, '<missing>'))[:80]}")
    for k in sorted(set(ref_t) | set(tensors)):
        if k not in ref_t or k not in tensors:
            bad.append(f"tensor {k}: only in {'reference' if k in ref_t else 'this run'}")
        elif not torch.equal(ref_t[k], tensors[k]):
            bad.append(f"tensor {k}: max |diff| {(ref_t[k].double() - tensors[k].double()).abs().max().item():.3g}")
    n_num = sum(len(v) for v in ref_n.values())
    if bad:
        print("\n".join(["DIFFERENT:", *bad]))
        return 1
    print(f"identical: {n_num} numbers ({len(ref_n.get('eval', {}))} from eval incl. every r_i) and {len(ref_t)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
