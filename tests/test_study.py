"""study.py end to end on Fashion-MNIST with tiny exported networks: JSON, tables, figures, user errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustx.export import save_model
from robustx.models import SmallCNN

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT.parent / "shared" / "datasets" / "fashion-mnist"
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason=f"needs {FMNIST}")

CHEAP = [
    "data=fashion_mnist", f"data.root={FMNIST}", "study.num_images=12", "study.batch_size=8", "study.bootstrap=20",
    "study.methods=[ae,gradcam,saliency]", "attack.steps=15", "attack.eps=2", "maps.ae_steps=3",
    "manipulation.budgets=[0.01,0.1]", "manipulation.steps=3", "manipulation.num_images=3", "faithfulness.steps=4",
    "figures.num_examples=2", "threads=1",
]


def run_study(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "ROBUSTX_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "study.py"), *overrides], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"study.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


def _export(path: Path, seed: int) -> Path:
    """A tiny SmallCNN fitted to the 12 study images (so the study has correctly classified images to attack)."""
    from datamodules import FashionMNISTDataModule

    dm = FashionMNISTDataModule(root=str(FMNIST), download=False, limit_test=12, num_workers=0)
    dm.prepare_data()
    dm.setup("test")
    x = torch.stack([dm.test_set[i][0] for i in range(12)])
    y = torch.tensor([int(dm.test_set[i][1]) for i in range(12)])
    torch.manual_seed(seed)
    cfg = {"_target_": "robustx.models.SmallCNN", "channels": [4, 8, 8], "hidden": 16}
    model = SmallCNN(channels=(4, 8, 8), hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return save_model(model, path, model_config=cfg)


def test_study_writes_json_tables_and_figures(tmp_path):
    a, b = _export(tmp_path / "a.safetensors", 0), _export(tmp_path / "b.safetensors", 1)
    proc = run_study(tmp_path, f"ckpt=[{a},{b}]", *CHEAP, "hydra.run.dir=out")
    out = tmp_path / "out"
    logs = proc.stdout + proc.stderr
    assert "minimal perturbation done in" in logs and "faithfulness (deletion/insertion AUC) done in" in logs
    for stem in ("a", "b"):
        res = json.loads((out / f"{stem}.json").read_text())
        assert res["num_images"] == 12 and len(res["ids"]) == 12
        assert {"invalidation", "faithfulness", "manipulation", "settings", "seconds", "versions"} <= set(res)
        assert len(res["invalidation"]["records"]) == res["num_correct"]
        assert res["settings"]["attack"]["steps"] == 15
        assert res["seconds"]["total"] > 0 and any(k.startswith("invalidation") for k in res["seconds"]["stages"])
        assert res["num_correct"] >= 6, res["num_correct"]
        if res["num_correct"]:
            assert set(res["faithfulness"]["summary"]) == {"ae", "gradcam", "saliency", "random"}
            assert len(res["manipulation"]["budgets"]) == 4
    for name in ("invalidation", "manipulation", "faithfulness"):
        text = (out / f"{name}.md").read_text()
        header = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("|")).split("|")]
        assert any(c == "a" or c.startswith("a:") for c in header) and any(c == "b" or c.startswith("b:") for c in header)
        rows = list(csv.reader((out / f"{name}.csv").open()))
        assert len(rows) > 1 and any(h.startswith("a_") for h in rows[0]) and any(h.startswith("b_") for h in rows[0])
    inv = list(csv.DictReader((out / "invalidation.csv").open()))
    assert {r["method"] for r in inv} == {"ae", "gradcam", "saliency"}
    assert (out / "manipulation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_user_error_exits_2_with_one_line(tmp_path):
    proc = run_study(tmp_path, "ckpt=/nonexistent.safetensors", *CHEAP, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "does not exist" in out and "Traceback" not in out, out[-1500:]


@pytest.mark.parametrize(
    "override, message",
    [
        ("study.methods=[gradcam,bogus]", "unknown method"),
        ("faithfulness.deletion_baseline=noise", "faithfulness.deletion_baseline must be"),
        ("study.frac=1.5", "study.frac must be in"),
        ("attack.steps=0", "attack.steps must be >= 1"),
        ("manipulation.num_images=0", "manipulation.num_images must be"),
    ],
)
def test_study_settings_errors(override, message):
    from hydra import compose, initialize_config_dir

    from lightning_modules.study_job import _settings

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="study", overrides=["ckpt=x.pt", override])
    with pytest.raises(ValueError, match=message):
        _settings(cfg)
