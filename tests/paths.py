"""Where the tests find the repository and the shared datasets and checkpoints (CI clones main with ../shared beside it)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
FMNIST = DATASETS / "fashion-mnist"
REFERENCE_CHECKPOINTS = SHARED / "reference-checkpoints"
