"""Plain helpers shared by test files (fixtures are in conftest.py, paths in paths.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import FMNIST, ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

FMNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

#: Skips a test (or, as ``pytestmark``, a file) where the shared Fashion-MNIST copy is missing.
needs_fmnist = pytest.mark.skipif(
    not all((FMNIST / f"{f}.gz").is_file() for f in FMNIST_FILES), reason=f"Fashion-MNIST IDX files not found in {FMNIST}"
)


def run_script(script: str, tmp_path: Path, *args: str, env: dict | None = None, check: bool = True,
               timeout: float = 600, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python <repo>/<script> *args`` in ``tmp_path``, with ``ROBUSTX_ROOT=tmp_path`` (logs, caches and runs stay there).

    ``env`` adds to the environment; the W&B API key is always removed, so no test uploads.
    ``launcher`` replaces ``python`` (e.g. torchrun). With ``check`` a non-zero exit fails the
    test with the end of the output.
    """
    e = {**os.environ, "ROBUSTX_ROOT": str(tmp_path), **(env or {})}
    e.pop("WANDB_API_KEY", None)
    proc = subprocess.run([*(launcher or [sys.executable]), str(ROOT / script), *args], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def colorbars(fig) -> list:
    """Colour-bar axes of a figure (inset ones included), found by their label."""
    from robustx.explain.figures import MAP_COLORBAR_LABEL

    axes = [a for ax in fig.axes for a in (ax, *ax.child_axes)]
    return [a for a in axes if MAP_COLORBAR_LABEL in (a.get_xlabel(), a.get_ylabel())]
