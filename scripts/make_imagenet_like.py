"""Write an ImageNet-shaped ImageFolder tree of photo-like JPEGs (for tests and input-pipeline benchmarks).

    .venv/bin/python scripts/make_imagenet_like.py --root /tmp/imagenet_like --classes 10 \
        --train-per-class 100 --val-per-class 10 [--seed 0] [--quality 90]

Layout as ILSVRC-2012's: ``root/train/<wnid>/<wnid>_<k>.JPEG`` and
``root/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``; the wnids are n01440764 (ImageNet's first) and then
increasing wnid-like names, the same for every seed. Each image is W x H with the long side drawn from
300-500 px and the aspect ratio from the usual photo ones (4:3, 3:2, 1:1, 5:4, 16:9; about 70%
landscape), JPEG quality 90 with 4:2:0 chroma subsampling (PIL's default), as most ImageNet files are.

Content (so that decoding costs what a photograph's does, not a flat colour's): a luminance field with
a 1/f-like spectrum (six octaves of bicubically upsampled Gaussian noise), smoother chroma fields, a
class-dependent colour cast, 3-12 shapes (ellipses, polygons, rectangles, lines) with sharp or
blurred edges and their own texture, and a little per-pixel sensor noise. Each image is drawn from its
own generator seeded by (seed, split, class, index): the tree is deterministic and independent of the
order the files are written in. numpy + PIL only, about 50 ms per image on one core. The files average
about 70 KB and 155 kpixels (3.7 bits/pixel); ILSVRC-2012's training files average about 110 KB (138 GB for
1,281,167 files), so these are somewhat cheaper to entropy-decode than the real ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Photo aspect ratios (long / short side) and how often each is drawn.
ASPECTS = (4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9)
ASPECT_P = (0.45, 0.2, 0.15, 0.1, 0.1)
SPLITS = {"train": 0, "val": 1}
LUM_STD, LUM_FALLOFF = 0.2, 0.95
FIRST_WNID = 1440764  # n01440764, ILSVRC-2012's first class (tench)


def wnids(n: int) -> list[str]:
    """``n`` increasing wnid-like folder names starting at n01440764 (fixed: they do not depend on the seed)."""
    rng = np.random.default_rng(FIRST_WNID)
    ids = FIRST_WNID + np.concatenate([[0], np.cumsum(rng.integers(500, 20000, size=max(0, n - 1)))])
    return [f"n{int(i):08d}" for i in ids]


def _upsample(field: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A small 2-D float field bicubically resized to ``size`` = (W, H)."""
    return np.asarray(Image.fromarray(field.astype(np.float32), mode="F").resize(size, Image.BICUBIC))


def _fractal(rng: np.random.Generator, size: tuple[int, int], *, octaves: int, falloff: float) -> np.ndarray:
    """Sum of upsampled noise octaves, amplitude ``falloff**k`` at 2**(k+1) cells: a 1/f-like random field."""
    w, h = size
    out = np.zeros((h, w), np.float32)
    for k in range(octaves):
        cells = 2 ** (k + 1)
        gw, gh = max(2, round(cells * w / max(w, h))), max(2, round(cells * h / max(w, h)))
        out += falloff**k * _upsample(rng.standard_normal((gh, gw)), size)
    return out


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(W, H): long side 300-500 px, a photo aspect ratio, landscape about 70% of the time."""
    # ImageNet's files are mostly 500 px on the long side (500x375, 500x333, ...), the rest smaller.
    long = 500 if rng.random() < 0.5 else int(rng.integers(300, 500))
    short = max(160, round(long / float(rng.choice(ASPECTS, p=ASPECT_P))))
    return (long, short) if rng.random() < 0.7 else (short, long)


def synth_image(rng: np.random.Generator, *, class_index: int, num_classes: int) -> Image.Image:
    """One photo-like RGB image (see the module docstring for what it contains)."""
    w, h = size = image_size(rng)
    # Luminance: nearly equal energy per octave (photographs' 1/f^2 power spectrum) down to 1-2 pixel
    # detail (fur, grass, foliage), which is what the entropy decoder spends its time on; chroma smoother.
    lum = _fractal(rng, size, octaves=9, falloff=LUM_FALLOFF)
    lum *= LUM_STD / (lum.std() + 1e-6)
    chroma = [0.05 * _fractal(rng, size, octaves=3, falloff=0.5) for _ in range(2)]
    detail = _fractal(rng, size, octaves=8, falloff=0.9)  # the shapes' own texture (shifted per shape)
    detail *= 0.14 / (detail.std() + 1e-6)
    # A class-dependent colour cast (a hue on the colour wheel) so that the classes are learnable.
    hue = 2 * np.pi * (class_index + 0.25 * rng.random()) / max(1, num_classes)
    cast = 0.04 * np.array([np.cos(hue), np.sin(hue)], np.float32)
    cb, cr = chroma[0] + cast[0], chroma[1] + cast[1]
    y = 0.45 + 0.1 * rng.standard_normal() + lum
    img = np.stack([y + 1.402 * cr, y - 0.344 * cb - 0.714 * cr, y + 1.772 * cb], axis=-1).astype(np.float32)

    # Shapes: objects and edges, each with its own colour and texture, sharp or soft-edged.
    for _ in range(int(rng.integers(3, 13))):
        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        cx, cy = rng.random() * w, rng.random() * h
        r = (0.05 + 0.3 * rng.random()) * min(w, h)
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse([cx - r, cy - r * (0.4 + rng.random()), cx + r, cy + r * (0.4 + rng.random())], fill=255)
        elif kind == 1:
            angles = np.sort(rng.random(int(rng.integers(3, 8))) * 2 * np.pi)
            radii = r * (0.5 + 0.5 * rng.random(angles.size))
            draw.polygon([(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(radii, angles)], fill=255)
        elif kind == 2:
            draw.rectangle([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=255)
        else:
            x1, y1 = rng.random() * w, rng.random() * h
            draw.line([(cx, cy), (x1, y1)], fill=255, width=int(rng.integers(2, 9)))
        if rng.random() < 0.5:
            mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 3.0))))
        colour = (0.15 + 0.7 * rng.random(3)).astype(np.float32)
        dy, dx = int(rng.integers(h)), int(rng.integers(w))
        box = mask.getbbox()
        if box is None:  # a shape entirely off the image
            continue
        x0, y0, x1, y1 = box  # composite inside the shape's bounding box only: 3-10x less work
        m = np.asarray(mask.crop(box), np.float32)[..., None] / 255.0
        texture = np.roll(detail, (dy, dx), axis=(0, 1))[y0:y1, x0:x1, None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - m) + (colour + texture) * m

    img += (4.0 / 255) * rng.standard_normal(img.shape, dtype=np.float32)  # sensor noise
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB")


def make_tree(root: str | Path, *, classes: int, train_per_class: int, val_per_class: int, seed: int = 0,
              quality: int = 90) -> dict[str, float]:
    """Write the tree under ``root`` (files already there are overwritten); returns counts, bytes and seconds."""
    root = Path(root)
    start = time.perf_counter()
    names = wnids(classes)
    count, nbytes, pixels, val_k = 0, 0, 0, 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(names):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, SPLITS[split], c, i])
                im = synth_image(rng, class_index=c, num_classes=classes)
                if split == "train":
                    path = folder / f"{wnid}_{i + 1}.JPEG"
                else:
                    val_k += 1
                    path = folder / f"ILSVRC2012_val_{val_k:08d}.JPEG"
                im.save(path, "JPEG", quality=quality)
                count += 1
                nbytes += path.stat().st_size
                pixels += im.width * im.height
    return {"images": count, "bytes": nbytes, "mean_kb": nbytes / max(1, count) / 1000,
            "bits_per_pixel": 8 * nbytes / max(1, pixels), "mean_pixels": pixels / max(1, count),
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="output folder (train/ and val/ are created in it)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (ImageNet's files: mostly about 90)")
    args = ap.parse_args(argv)
    if args.classes < 1 or args.train_per_class < 0 or args.val_per_class < 0:
        ap.error("--classes must be >= 1 and the per-class counts >= 0")
    s = make_tree(args.root, classes=args.classes, train_per_class=args.train_per_class,
                  val_per_class=args.val_per_class, seed=args.seed, quality=args.quality)
    print(f"{s['images']} images in {args.root}: {s['bytes'] / 1e6:.1f} MB, {s['mean_kb']:.0f} KB and "
          f"{s['mean_pixels'] / 1e3:.0f} kpixels each on average ({s['bits_per_pixel']:.2f} bits/pixel), "
          f"{s['seconds']:.1f} s", file=sys.stdout)


if __name__ == "__main__":
    main()
