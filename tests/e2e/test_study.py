"""study.py end to end on Fashion-MNIST with tiny exported networks: JSON, tables, figures, user errors,
incremental outputs, resume from the per-batch cache, output names and the time estimate."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from robustx.io.export import save_model
from robustx.models import SmallCNN

from tests.helpers import PNG_MAGIC, needs_fmnist, run_script
from tests.paths import CONF, FMNIST

pytestmark = needs_fmnist

CHEAP = [
    "data=fashion_mnist", f"data.root={FMNIST}", "study.num_images=12", "study.batch_size=8", "study.bootstrap=20",
    "study.methods=[ae,gradcam,saliency]", "attack.steps=15", "attack.eps=2", "maps.ae_steps=3",
    "manipulation.budgets=[0.01,0.1]", "manipulation.steps=3", "manipulation.num_images=3", "faithfulness.steps=4",
    "figures.num_examples=2", "threads=1",
]


def run_study(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_script("study.py", tmp_path, *overrides, env={"OMP_NUM_THREADS": "1"}, check=check)


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
        assert res["partial"] is False and res["images_done"] == 12 and res["name"] == stem
        assert {"invalidation", "faithfulness", "manipulation", "settings", "seconds", "versions"} <= set(res)
        assert len(res["invalidation"]["records"]) == res["num_correct"]
        assert res["settings"]["attack"]["steps"] == 15
        assert res["seconds"]["total"] > 0 and any(k.startswith("invalidation") for k in res["seconds"]["stages"])
        sec = res["seconds"]
        assert sec["total"] >= sum(v for k, v in sec["stages"].items() if k.startswith("manipulation")) > 0
        assert sec["wall_this_run"] > 0 and sec["batches"] == 2 and sec["batches_resumed"] == 0
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
    assert (out / "manipulation.png").read_bytes()[:8] == PNG_MAGIC


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
def test_study_settings_errors(tmp_path, override, message):
    """Bad settings: the study job raises a one-line ValueError (jobs.cli.run_job: one log line, exit 2) before any work."""
    from hydra import compose, initialize_config_dir

    from jobs.cli import USER_ERRORS
    from jobs.study import run_study as job

    (tmp_path / "x.pt").write_bytes(b"")  # an existing path: the settings are checked before the checkpoint is read
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="study", overrides=[f"ckpt={tmp_path / 'x.pt'}", override, f"paths.root_dir={tmp_path}",
                                                      f"paths.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match=message) as err:
        job(cfg)
    assert isinstance(err.value, USER_ERRORS)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# --- incremental outputs, resume, output names, estimate (in-process: seconds each) ------------

#: 12 images in batches of 5, 5 and 2; the manipulation's 7 images span the first two batches.
TINY = [c for c in CHEAP if not c.startswith(("study.batch_size", "manipulation.num_images", "threads"))] + [
    "study.batch_size=5", "manipulation.num_images=7", "progress.bar=false"]


class _Killed(RuntimeError):
    """Stands in for the study being killed mid-run."""


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def study_in_process(root: Path, out: Path, *overrides: str) -> list[dict]:
    """The study job in this process: cache under ``root/logs``, outputs in ``out``."""
    from hydra import compose, initialize_config_dir

    from jobs.study import run_study as job

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="study", overrides=[*overrides, f"paths.root_dir={root}", f"paths.output_dir={out}"])
    torch.set_num_threads(1)
    return job(cfg)


def _outputs(out: Path) -> dict[str, object]:
    """Every JSON (without its timing and cache location) and every table of a run directory."""
    got: dict[str, object] = {}
    for f in sorted(out.glob("*.json")):
        res = json.loads(f.read_text())
        res.pop("seconds")
        res.pop("cache")
        got[f.name] = res
    for f in sorted([*out.glob("*.md"), *out.glob("*.csv")]):
        got[f.name] = f.read_text()
    return got


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("nets")
    return {"a": _export(d / "a.safetensors", 0), "b": _export(d / "b.safetensors", 1)}


@pytest.fixture(scope="module")
def reference(nets, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted tiny study of network a: its root (cache under logs/) and run directory."""
    root = tmp_path_factory.mktemp("reference")
    study_in_process(root, root / "out", f"ckpt={nets['a']}", *TINY)
    return {"root": root, "out": root / "out", "ckpt": nets["a"]}


def _cache_dir(root: Path) -> Path:
    (d,) = (root / "logs" / "study_cache").iterdir()
    return d


def test_partial_json_and_tables_after_the_first_batch_then_resume_matches_uninterrupted(reference, tmp_path, monkeypatch):
    import jobs.study as job

    real, calls = job.invalidation_study, []

    def killed_in_second_batch(*args, **kwargs):
        if calls:
            raise _Killed()
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "invalidation_study", killed_in_second_batch)
    out = tmp_path / "out"
    with pytest.raises(_Killed):
        study_in_process(tmp_path, out, f"ckpt={reference['ckpt']}", *TINY)
    # what the killed run left: the first batch's JSON, tables and cache
    res = json.loads((out / "a.json").read_text())
    assert res["partial"] is True and res["images_done"] == 5 and res["num_images"] == 12 and len(res["ids"]) == 5
    assert len(res["invalidation"]["records"]) == res["num_correct"] > 0
    assert res["manipulation"]["num_images"] == 5 and all(r["n"] == 5 for r in res["manipulation"]["budgets"])
    assert set(res["faithfulness"]["per_image"]) == {"ae", "gradcam", "saliency", "random"}
    for name in ("invalidation", "manipulation", "faithfulness"):
        md = (out / f"{name}.md").read_text()
        assert md.startswith("**Partial results** (partial: a 5 of 12 images)") and "a (partial 5/12)" in md
        rows = list(csv.DictReader((out / f"{name}.csv").open()))
        assert rows and all(r["status"] == "partial: a 5 of 12 images" for r in rows)
    cache = _cache_dir(tmp_path)
    assert (cache / "batch_00000.json").is_file() and not (cache / "batch_00001.json").exists()
    assert (cache / "figures_00000.safetensors").read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    # the rerun resumes the first batch and ends where an uninterrupted run does
    monkeypatch.setattr(job, "invalidation_study", real)
    (res,) = study_in_process(tmp_path, out, f"ckpt={reference['ckpt']}", *TINY)
    assert res["partial"] is False and res["seconds"]["batches_resumed"] == 1 and res["seconds"]["batches"] == 3
    assert res["seconds"]["compute_this_run"] < res["seconds"]["total"]  # the cached batch's seconds are counted
    assert _outputs(out) == _outputs(reference["out"])
    for name in ("invalidation", "manipulation", "faithfulness"):
        assert "Partial" not in (out / f"{name}.md").read_text()


def test_rerun_with_a_full_cache_computes_nothing_and_gives_the_same_outputs(reference, tmp_path):
    shutil.copytree(reference["root"] / "logs", tmp_path / "logs")
    (res,) = study_in_process(tmp_path, tmp_path / "out", f"ckpt={reference['ckpt']}", *TINY)
    sec = res["seconds"]
    assert sec["batches_resumed"] == 3
    assert set(sec["stages"]) >= {"invalidation: minimal perturbation", "faithfulness (deletion/insertion AUC)",
                                  "manipulation map_preserving 0.01", "figures"}
    assert sec["compute_this_run"] == pytest.approx(sec["stages"]["figures"])  # only the figure was drawn again
    assert _outputs(tmp_path / "out") == _outputs(reference["out"])
    assert (tmp_path / "out" / "a_maps.png").is_file()


def test_corrupt_cache_files_are_ignored_with_a_warning(reference, tmp_path, caplog):
    shutil.copytree(reference["root"] / "logs", tmp_path / "logs")
    cache = _cache_dir(tmp_path)
    (cache / "batch_00001.json").write_text('{"ids": [5, 6')  # cut off mid-write
    (next(cache.glob("manipulation-*_00001.json"))).write_bytes(b"\x00\xff garbage")
    fig = cache / "figures_00000.safetensors"
    fig.write_bytes(fig.read_bytes()[:100])
    caplog.set_level(logging.INFO, logger="jobs.study")
    (res,) = study_in_process(tmp_path, tmp_path / "out", f"ckpt={reference['ckpt']}", *TINY)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ignoring corrupt cache file" in r.getMessage()]
    assert len(warned) == 3, warned
    assert res["seconds"]["batches_resumed"] == 1  # batch 0 (its figure file) and batch 1 were computed again
    assert _outputs(tmp_path / "out") == _outputs(reference["out"])
    assert json.loads((cache / "batch_00001.json").read_text())["ids"] == [5, 6, 7, 8, 9]  # rewritten


def test_two_checkpoints_with_the_same_file_name_get_distinct_outputs(nets, tmp_path):
    for run, net in (("runA", "a"), ("runB", "b")):
        (tmp_path / run).mkdir()
        shutil.copy(nets[net], tmp_path / run / "model.safetensors")
    ckpt = f"ckpt=[{tmp_path / 'runA' / 'model.safetensors'},{tmp_path / 'runB' / 'model.safetensors'}]"
    out = tmp_path / "out"
    results = study_in_process(tmp_path, out, ckpt, *TINY, "study.num_images=6", "study.batch_size=6", "manipulation.num_images=2")
    assert [r["name"] for r in results] == ["runA_model", "runB_model"]
    a, b = (json.loads((out / f"{n}.json").read_text()) for n in ("runA_model", "runB_model"))
    assert a["checkpoint"].endswith("runA/model.safetensors") and b["checkpoint"].endswith("runB/model.safetensors")
    assert a["invalidation"]["records"] != b["invalidation"]["records"]
    assert not (out / "model.json").exists()
    assert (out / "runA_model_maps.png").is_file() and (out / "runB_model_maps.png").is_file()
    for name in ("invalidation", "manipulation", "faithfulness"):
        header = [c.strip() for c in next(x for x in (out / f"{name}.md").read_text().splitlines() if x.startswith("|")).split("|")]
        assert any(c.startswith("runA_model") for c in header) and any(c.startswith("runB_model") for c in header), header
        cols = next(csv.reader((out / f"{name}.csv").open()))
        assert any(c.startswith("runA_model_") for c in cols) and any(c.startswith("runB_model_") for c in cols)


def test_estimate_line_with_a_quick_look_hint_is_logged_before_most_of_the_work(nets, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jobs.study")
    study_in_process(tmp_path, tmp_path / "out", f"ckpt={nets['b']}", *TINY, "progress.estimate_after=1e-6", "progress.long_seconds=0")
    msgs = [r.getMessage() for r in caplog.records]
    first_batch = next(i for i, m in enumerate(msgs) if "batch 1/3 done" in m)
    est = [i for i, m in enumerate(msgs) if m.startswith("estimate: search (image-steps) about")]
    assert est and est[0] < first_batch, msgs[: first_batch + 1]
    line = msgs[est[0]]
    assert "on this machine" in line and "For a quick look: study.num_images=10" in line, line
    kinds = {m.split(" about")[0] for m in msgs if m.startswith("estimate: ")}
    assert kinds == {f"estimate: {k}" for k in ("search (image-steps)", "maps (image-maps)", "faithfulness (image-maps)",
                                                "manipulation (image-steps)")}
    assert "left for the study" in msgs[first_batch]  # an ETA after the first batch

