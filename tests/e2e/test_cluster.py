"""Beyond one process: submitit's launcher (multirun, preemption + requeue + auto-resume), Optuna sweeps
with a resumable SQLite study, and two "nodes" on localhost (scripts/multinode_localhost.sh)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import needs_fmnist, run_script
from tests.paths import CONF, FMNIST, ROOT

pytestmark = needs_fmnist

TINY = [f"data.root={FMNIST}", "data.limit_val=256", "trainer.enable_progress_bar=false", "test=false"]
ARA = ["callbacks=ara", "callbacks.ara_evaluation.fixed_radius=none", "callbacks.ara_evaluation.bootstrap=20",
       "callbacks.ara_evaluation.batch_size=8"]


def _env(tmp_path: Path) -> dict:
    e = {**os.environ, "ROBUSTX_ROOT": str(tmp_path), "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    e.pop("WANDB_API_KEY", None)
    return e


@pytest.mark.slow
def test_submitit_local_multirun_runs_each_job_in_its_own_folder_with_ddp_tasks(tmp_path):
    # trainer=ddp_sim: two submitit tasks per job (tasks_per_node = trainer.devices), each one DDP rank.
    run_script("train.py", tmp_path, "-m", "+experiment=demo", "hydra/launcher=local", "trainer=ddp_sim", "logger=csv",
               *TINY, "data.limit_train=512", "trainer.max_epochs=1", "method.l_target=2.5,3.0",
               f"hydra.sweep.dir={tmp_path / 'sweep'}")
    results = [json.loads((tmp_path / "sweep" / str(k) / "metrics.json").read_text()) for k in (0, 1)]
    assert [r["method"]["l_target"] for r in results] == [2.5, 3.0]
    for k in (0, 1):
        states = [json.loads((tmp_path / "sweep" / str(k) / f"rank{r}_state.json").read_text()) for r in (0, 1)]
        assert states[0]["psi"] == states[1]["psi"] and states[0]["global_step"] == 2  # 512 images / 2 ranks / 128
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_1_log.out"))) == 2  # task 1 of each of the 2 jobs


def test_launcher_configs_wire_lightning_to_the_cluster():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=demo", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                                          "hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    # one srun task per GPU on every node: Lightning's SLURMEnvironment then reads the ranks
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.max_num_timeout > 0 and cfg.auto_resume == "auto"


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_resumes_by_itself(tmp_path):
    args = ["+experiment=demo", "logger=csv", *TINY, "data.limit_train=2048", "trainer.max_epochs=2", "method.l_target=3.0"]
    run_script("train.py", tmp_path, *args, f"hydra.run.dir={tmp_path / 'ref'}")
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *args, "hydra/launcher=local",
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # into epoch 2
    task = subprocess.run(["pgrep", "-f", f"submitit.core._submit {sweep}"], capture_output=True, text=True).stdout.split()
    assert task, "no submitit task found"
    os.kill(int(task[0]), signal.SIGUSR2)  # what SLURM sends before a preemption or the time limit
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    job_log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "this job is preempted" in job_log and "Requeued job" in job_log
    assert f"resuming this job from its own checkpoint {last}" in job_log
    ref, res = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "ref", sweep / "0"))
    assert res["global_steps"] == ref["global_steps"] == 32 and res["steps_this_run"] < 32
    for k in ("val/acc", "val/ce", "train/psi_integral"):
        assert res["metrics"][k] == pytest.approx(ref["metrics"][k], rel=1e-6), k
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(sweep / "0" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def _trials(db: Path) -> list[tuple[str, float | None]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT t.state, v.value FROM trials t LEFT JOIN trial_values v USING (trial_id) "
                           "ORDER BY t.number").fetchall()


def test_optuna_sweep_objective_floor_and_resume(tmp_path):
    args = ["-m", "+experiment=demo", "hparams_search=optuna_l_target", *ARA, "callbacks.ara_evaluation.every_n_epochs=1",
            "callbacks.ara_evaluation.num_images=16", "callbacks.ara_evaluation.final=false", *TINY,
            "data.limit_train=512", "trainer.max_epochs=1", "objective_floor.min=0.05", "hydra.sweeper.n_trials=3"]
    run_script("train.py", tmp_path, *args, f"hydra.sweep.dir={tmp_path / 's1'}", env={"WANDB_MODE": "offline"})
    db = tmp_path / "logs" / "optuna" / "demo_l_target.db"
    trials = _trials(db)
    assert len(trials) == 3 and all(state == "COMPLETE" for state, _ in trials)
    # the objective is each trial's last periodic BTR ARA (accuracy is above the floor)
    aras = [json.loads((tmp_path / "s1" / str(k) / "ara_epoch000.json").read_text())["btr/ara"] for k in range(3)]
    assert [v for _, v in trials] == pytest.approx(aras, rel=1e-6)
    l_targets = [json.loads((tmp_path / "s1" / str(k) / "metrics.json").read_text())["method"]["l_target"] for k in range(3)]
    assert len(set(l_targets)) == 3 and all(0.3 <= v <= 2.0 for v in l_targets)
    # each trial is a W&B run of its own, in the sweep's group
    runs = sorted((tmp_path / "s1").glob("*/wandb/offline-run-*"))
    assert len(runs) == 3
    # the same command again continues the study; a floor above the accuracy scores the penalty
    run_script("train.py", tmp_path, *args[:-2], "objective_floor.min=0.99", "objective_floor.penalty=-1",
               "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 's2'}", env={"WANDB_MODE": "offline"})
    trials = _trials(db)
    assert len(trials) == 4 and trials[-1] == ("COMPLETE", -1.0)


@pytest.mark.slow
def test_two_nodes_on_localhost_share_psi_write_once_and_match_one_process(tmp_path):
    run = tmp_path / "two_nodes"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "multinode_localhost.sh"), str(run), "+experiment=demo", *TINY,
                           "data.limit_train=1024", "trainer.max_epochs=1", "method.l_target=3.0", *ARA,
                           "callbacks.ara_evaluation.every_n_epochs=0", "callbacks.ara_evaluation.final_num_images=16",
                           "callbacks.ara_evaluation.final_protocol=cheap"],
                          cwd=tmp_path, env={**_env(tmp_path), "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out and "GLOBAL_RANK: 0, MEMBER: 1/2" in out
    states = [json.loads((run / f"rank{r}_state.json").read_text()) for r in (0, 1)]
    assert states[0]["psi_integral"] > 0 and states[0]["psi"] == states[1]["psi"]
    assert states[0]["global_step"] == 4  # 1024 images / 2 nodes / batch 128
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    assert len(list(run.glob("wandb/offline-run-*"))) == 1
    # The ARA gathered from both nodes equals one process's on the same images and weights.
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from robustx.io.export import load_model
    from robustx.robustness.ara import evaluate_batch
    from robustx.robustness.metric import ARAMetric

    final = json.loads((run / "ara_final.json").read_text())
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=demo", *TINY])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    model, _ = load_model(run / "model.safetensors")
    x = torch.stack([dm.val_set[i][0] for i in range(16)])
    y = torch.tensor([int(dm.val_set[i][1]) for i in range(16)])
    s = final["settings"]
    r = evaluate_batch(model, x, y, steps=s["steps"], eps=s["eps"], momentum=s["momentum"])
    metric = ARAMetric(10, bootstrap=20)
    metric.update(r["r_attack"], r["r_btr"], torch.arange(16))
    single = metric.compute()
    assert len(final["r_attack"]) == 16  # gathered from both nodes
    torch.testing.assert_close(torch.tensor(final["r_attack"], dtype=torch.float64), metric.values("attack"), rtol=1e-5, atol=1e-6)
    assert final["attack/ara"] == pytest.approx(single["attack/ara"], rel=1e-5)
    assert final["btr/ara"] == pytest.approx(single["btr/ara"], rel=1e-5)
