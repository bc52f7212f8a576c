"""eval.py end to end: JSON schema, curves PNG, resume from cached batches, several checkpoints, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustx.io.export import save_model
from robustx.models import SmallCNN

from tests.helpers import PNG_MAGIC, needs_fmnist, run_script
from tests.paths import CONF, DATASETS, FMNIST, REFERENCE_CHECKPOINTS, ROOT

pytestmark = needs_fmnist

CHEAP = [
    "data=fashion_mnist",
    f"data.root={FMNIST}",
    "ara.protocol=cheap",
    "ara.steps=12",
    "ara.num_images=16",
    "ara.batch_size=8",
    "ara.bootstrap=50",
    "cross_check.attacks=[alma]",
    "cross_check.steps=30",
    "fixed_radius.version=none",  # tested on its own below
    # the fp32 eager path (the default "auto" compiles, which the test below covers once)
    "ara.bf16=false",
    "ara.channels_last=false",
    "ara.compile=false",
]


def run_eval(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_script("eval.py", tmp_path, *overrides, check=check)


def _export(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = {"_target_": "robustx.models.SmallCNN", "channels": [8, 8, 8], "hidden": 16}
    return save_model(SmallCNN(channels=(8, 8, 8), hidden=16), path, model_config=cfg)


def test_eval_json_png_resume_and_several_checkpoints(tmp_path):
    # Every training run exports model.safetensors: two of them must get distinct outputs and labels.
    (tmp_path / "runA").mkdir()
    (tmp_path / "runB").mkdir()
    a, b = _export(tmp_path / "runA" / "model.safetensors", 0), _export(tmp_path / "runB" / "model.safetensors", 1)
    proc = run_eval(tmp_path, f"ckpt=[{a},{b}]", *CHEAP, "hydra.run.dir=out1")
    res = json.loads((tmp_path / "out1" / "runA_model.json").read_text())
    other = json.loads((tmp_path / "out1" / "runB_model.json").read_text())
    assert (res["name"], other["name"]) == ("runA_model", "runB_model") and other["checkpoint"] == str(b)
    assert res["attack"]["r"] != other["attack"]["r"]
    assert not (tmp_path / "out1" / "model.json").exists()
    # Progress is counted in image-steps, and the final line's seconds include the cross-check.
    out = proc.stdout + proc.stderr
    assert "16 images x (12 cheap search (attack) + 12 cheap search (btr) + 30 cross-check alma) = 864 image-steps" in out, out[-3000:]
    assert "image-step" in out and "?batch/s" not in out
    assert set(res["seconds_by_stage"]) == {"search", "alma"} and res["seconds_by_stage"]["alma"] > 0
    assert res["seconds"] == pytest.approx(sum(res["seconds_by_stage"].values()))
    for key in ("checkpoint", "accuracy", "attack", "btr", "ensemble", "cross_check", "settings", "versions", "seconds", "ids", "warnings"):
        assert key in res, key
    for mode in ("attack", "btr"):
        m = res[mode]
        assert {"ara", "ara_binned", "ara_ci_low", "ara_ci_high", "median_r", "r"} <= set(m)
        assert len(m["r"]) == 16 and m["ara_ci_low"] <= m["ara"] <= m["ara_ci_high"]
    # eps = 0 of the curve is the clean accuracy
    assert sum(r > 0 for r in res["attack"]["r"]) / 16 == pytest.approx(res["accuracy"])
    assert res["ensemble"]["ara"] <= res["attack"]["ara"] + 1e-12
    assert res["settings"]["steps"] == 12 and res["versions"]["torch"] == torch.__version__
    for f in ("runA_model.png", "runB_model.png", "curves.png"):
        assert (tmp_path / "out1" / f).read_bytes()[:8] == PNG_MAGIC
    # A second run over the same images resumes every batch from the cache, with identical results.
    proc = run_eval(tmp_path, f"ckpt={a}", *CHEAP, "hydra.run.dir=out2")
    assert "resumed 2 of 2 batches" in proc.stdout + proc.stderr
    res2 = json.loads((tmp_path / "out2" / "model.json").read_text())
    assert res2["attack"]["r"] == res["attack"]["r"]
    # The search's cost survives the resume (summed from the cached batches), not 0 s.
    assert res["seconds"] > 0 and res2["seconds"] == pytest.approx(res["seconds"])
    assert res2["batches_resumed"] == 2 and res2["batches_without_timing"] == 0
    # The cache unit is one criterion (or cross-check attack) of one batch: a run killed inside
    # batch 2's BTR search keeps everything before it and recomputes only that unit.
    key = Path(re.search(r"per-batch results cached in (\S+)", proc.stdout + proc.stderr).group(1))
    (key / "batch_00001_btr.json").unlink()
    proc = run_eval(tmp_path, f"ckpt={a}", *CHEAP, "hydra.run.dir=out3")
    assert "resumed 1 of 2 batches" in proc.stdout + proc.stderr
    res3 = json.loads((tmp_path / "out3" / "model.json").read_text())
    assert res3["btr"]["r"] == pytest.approx(res["btr"]["r"], rel=1e-6) and res3["attack"]["r"] == res["attack"]["r"]
    # An edited cache record (r_i scaled) and an empty one are detected and recomputed, never used.
    edited = json.loads((key / "batch_00000_attack.json").read_text())
    edited["r_attack"] = [2 * r for r in edited["r_attack"]]
    (key / "batch_00000_attack.json").write_text(json.dumps(edited))
    (key / "alma-30_batch_00001.json").write_text("{}")
    proc = run_eval(tmp_path, f"ckpt={a}", *CHEAP, "hydra.run.dir=out4")
    assert (proc.stdout + proc.stderr).count("ignoring corrupt or edited cache file") == 2
    res4 = json.loads((tmp_path / "out4" / "model.json").read_text())
    assert res4["attack"]["r"] == pytest.approx(res["attack"]["r"], rel=1e-6)
    assert res4["cross_check"]["alma"]["r"] == res["cross_check"]["alma"]["r"]  # None: ALMA failed on that image
    assert res4["ensemble"]["ara"] == pytest.approx(res["ensemble"]["ara"], rel=1e-6)


@pytest.mark.slow
def test_auto_fast_path_resolves_per_device_and_agrees_with_fp32(tmp_path):
    """ara.bf16/channels_last/compile=auto: the fast path where bf16 is native; settings record it."""
    from jobs.evaluate import native_bf16

    a = _export(tmp_path / "a.safetensors", 0)
    auto = [o for o in CHEAP if not o.startswith(("ara.bf16", "ara.channels_last", "ara.compile"))]
    run_eval(tmp_path, f"ckpt={a}", *auto, "cross_check.attacks=[]", "hydra.run.dir=auto")
    run_eval(tmp_path, f"ckpt={a}", *CHEAP, "cross_check.attacks=[]", "hydra.run.dir=fp32")
    fast = json.loads((tmp_path / "auto" / "a.json").read_text())
    ref = json.loads((tmp_path / "fp32" / "a.json").read_text())
    native = native_bf16("cpu")
    assert fast["settings"]["bf16"] is native and fast["settings"]["compile"] is native
    assert ref["settings"]["bf16"] is False and ref["settings"]["compile"] is False
    assert fast["accuracy"] == ref["accuracy"]  # the clean pass and the re-check are fp32
    for mode in ("attack", "btr"):
        assert fast[mode]["ara"] == pytest.approx(ref[mode]["ara"], rel=0.1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("ara.protocol=bogus", "unknown ara.protocol"),
        ("ara.steps=0", "must be > 0"),
        ("ara.bf16=maybe", "ara.bf16 must be true, false or auto"),
        ("fast_attacks=maybe", "fast_attacks must be true or false"),
        ("ara.eps=nan", "ara.eps must be a finite number"),
        ("ara.steps=nan", "ara.steps must be a finite number"),
        ("ara.steps=2.5", "ara.steps and ara.refine must be whole numbers"),
        ("ara.num_images=0", "ara.num_images must be a whole number > 0"),
        ("cross_check.attacks=[cw]", "unknown minimal-norm attack"),
        ("cross_check.preset=everything", "unknown ensemble preset"),
        ("fixed_radius.version=plus", "fixed_radius.version must be one of"),
        ("fixed_radius.threat_models=[{norm: L2, eps: 0}]", "eps must be a finite number > 0"),
        ("fixed_radius.threat_models=[{norm: L1, eps: 1}]", "norm must be one of"),
    ],
)
def test_eval_user_errors_in_process(tmp_path, override, message):
    """Bad ara.* settings: the eval job raises a one-line ValueError (jobs.cli.run_job: one log line, exit 2)."""
    from hydra import compose, initialize_config_dir

    from jobs.cli import USER_ERRORS
    from jobs.evaluate import evaluate

    a = _export(tmp_path / "a.safetensors", 0)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("eval", overrides=[f"ckpt={a}", *CHEAP, override, f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        evaluate(cfg)
    assert isinstance(err.value, USER_ERRORS)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before any output


def test_eval_user_error_cli_exits_2_with_one_line(tmp_path):
    proc = run_eval(tmp_path, "ckpt=/nonexistent.safetensors", *CHEAP, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "does not exist" in out and "Traceback" not in out, out[-1500:]


REF = REFERENCE_CHECKPOINTS
TRAINED = ROOT / "docs" / "precision" / "fp32_vs_bf16" / "32-true" / "model.safetensors"  # a published Fashion-MNIST small CNN


def test_eval_fixed_radius_ensemble_flags_and_result_files(tmp_path):
    import csv

    import yaml

    from robustx.io.export import load_model

    cheap = [o for o in CHEAP if not o.startswith(("cross_check.attacks", "fixed_radius"))]
    run_eval(tmp_path, f"ckpt={TRAINED}", *cheap, "cross_check.preset=thorough", "fixed_radius.version=quick",
             "hydra.run.dir=out")  # standard's composition: tests/unit/test_fixed_radius_and_ensemble.py
    out = tmp_path / "out"
    res = json.loads((out / "model.json").read_text())
    # the dataset's threat models (conf/data/fashion_mnist.yaml), each also as RMSE
    fr = {(e["norm"], e["eps"]): e for e in res["fixed_radius"]}
    assert set(fr) == {("L2", 1.5), ("Linf", 0.1)}
    assert fr["L2", 1.5]["eps_rmse"] == pytest.approx(1.5 / 28) and fr["Linf", 0.1]["eps_rmse"] == 0.1
    for e in fr.values():
        after = list(e["robust_accuracy_after"].values())
        assert e["attacks"] == ["apgd-ce", "apgd-t"] == list(e["robust_accuracy_after"])
        assert after == sorted(after, reverse=True) and after[-1] == e["robust_accuracy"] <= e["clean_accuracy"] == res["accuracy"]
        assert e["robust_accuracy"] == pytest.approx(sum(e["robust"]) / 16)
        assert e["forwards"] > 0 and sum(e["broken_by"].values()) == round(16 * (e["clean_accuracy"] - e["robust_accuracy"]))
    ens = res["ensemble"]
    assert ens["attacks"] == ["paper", "ddn", "fmn", "alma", "fab"] and set(ens["optimality"]) == set(ens["attacks"])
    assert ens["strongest"] == max(ens["optimality"], key=ens["optimality"].get) and max(ens["optimality"].values()) <= 1
    assert {"randomness", "softmax_outputs", "zero_gradients", "search_vs_ddn", "fixed_radius_above_minimal_norm_L2_1.5"} <= set(res["flags"])
    assert not res["flags"]["randomness"]["raised"] and not res["flags"]["softmax_outputs"]["raised"]
    # Per-image CSV: the same numbers as the JSON.
    rows = list(csv.DictReader((out / "model_per_image.csv").open()))
    assert len(rows) == 16 and [int(r["id"]) for r in rows] == res["ids"]
    assert [float(r["r_ensemble"]) for r in rows] == pytest.approx(ens["r"])
    assert [int(r["robust_L2_1.5"]) for r in rows] == [int(b) for b in fr["L2", 1.5]["robust"]]
    assert [int(r["correct"]) for r in rows] == [int(c) for c in res["correct"]]
    # RobustBench-style entries, one per threat model.
    rb = json.loads((out / "robustbench" / "fashion_mnist" / "L2" / "model.json").read_text())
    assert rb["autoattack_acc"] == f"{100 * fr['L2', 1.5]['robust_accuracy']:.2f}" and rb["clean_acc"] == f"{100 * res['accuracy']:.2f}"
    assert rb["threat_model"] == "L2" and rb["eps"] == "1.5" and rb["ara_ensemble"] == ens["ara"]
    # The model card: its model-index block holds the same numbers; the weights beside it load.
    text = (out / "model_card" / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics["Clean accuracy"] == pytest.approx(res["accuracy"])
    assert metrics["Robust accuracy, AutoAttack (quick) Linf eps=0.1"] == pytest.approx(fr["Linf", 0.1]["robust_accuracy"])
    assert metrics["Attack ARA (ensemble)"] == pytest.approx(ens["ara"], abs=1e-6)
    copy, _ = load_model(out / "model_card" / "model.safetensors")
    orig, _ = load_model(TRAINED)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(copy(x), orig(x))


@pytest.mark.slow
@pytest.mark.skipif(not (REF / "resnet44-robust.pt").is_file(), reason="needs the reference checkpoints")
def test_reference_networks_rank_as_expected(tmp_path):
    names = ["resnet44-standard", "resnet44-adv-train", "resnet44-robust"]
    ckpts = ",".join(str(REF / f"{n}.pt") for n in names)
    run_eval(
        tmp_path, f"ckpt=[{ckpts}]", f"data.root={DATASETS / 'cifar10-jpeg'}", "ara.protocol=cheap",
        "ara.num_images=40", "ara.batch_size=40", "ara.bootstrap=0", "ara.modes=[btr]", "cross_check.attacks=[]", "fixed_radius.version=none",
        "hydra.run.dir=out",
    )
    ara = {n: json.loads((tmp_path / "out" / f"{n}.json").read_text())["btr"]["ara"] for n in names}
    assert ara["resnet44-standard"] * 3 < ara["resnet44-adv-train"] < ara["resnet44-robust"], ara


def test_eval_torchrun_two_ranks_equals_one_process(tmp_path):
    a = _export(tmp_path / "a.safetensors", 0)
    run_eval(tmp_path, f"ckpt={a}", *CHEAP, "hydra.run.dir=single", "paths.log_dir=logs_single")
    torchrun = Path(sys.executable).with_name("torchrun")
    run_script("eval.py", tmp_path, f"ckpt={a}", *CHEAP, "hydra.run.dir=multi", "paths.log_dir=logs_multi", env={"OMP_NUM_THREADS": "1"},
               launcher=[str(torchrun), "--standalone", "--nproc_per_node=2"])
    one = json.loads((tmp_path / "single" / "a.json").read_text())
    two = json.loads((tmp_path / "multi" / "a.json").read_text())
    assert two["ids"] == one["ids"]
    for mode in ("attack", "btr"):
        assert two[mode]["r"] == pytest.approx(one[mode]["r"], rel=1e-5, abs=1e-7)
    # each rank computed its own batches
    assert len(list((tmp_path / "logs_multi" / "eval_cache").glob("*/batch_*_attack.json"))) == 2
