"""Kill training and evaluation with SIGKILL at random points (and during checkpoint writes); resume; compare.

For each trial the killed job is rerun the way a user would (train.py with ``ckpt_path=<run>/checkpoints/last.ckpt``
when it exists, eval.py with the same command: its per-batch cache resumes) and its result is compared with an
uninterrupted reference run: the exported weights, the metrics, the per-image r_i. Every file the killed job left
is checked (checkpoints load, JSON parses, safetensors load, eval-cache records pass their checksum). Prints a
table and writes the figures as JSON (docs/reliability.md shows them).

    python scripts/fault_soak.py --train-kills 10 --eval-kills 10 --out docs/reliability/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = ["+experiment=demo", "logger=csv", "test=false", "data.limit_train=2048", "data.limit_val=256",
         "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "method.l_target=3.0"]
EVAL = ["data=fashion_mnist", "ara.protocol=cheap", "ara.steps=12", "ara.num_images=32", "ara.batch_size=8",
        "ara.bootstrap=50", "cross_check.attacks=[alma]", "cross_check.steps=30", "fixed_radius.version=none",
        "ara.bf16=false", "ara.compile=false"]


def _env(work: Path) -> dict:
    env = {**os.environ, "ROBUSTX_ROOT": str(work), "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    return env


def _run(script: str, args: list[str], work: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=work, env=_env(work), capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc


def _kill_at(script: str, args: list[str], work: Path, *, after: float | None = None, watch: Path | None = None,
             nth_write: int = 1, event=None, delay: float = 0.0) -> dict:
    """Start the job; SIGKILL it ``after`` seconds in, ``delay`` seconds after ``event()`` first holds, or while
    its ``nth_write``-th temporary file is in ``watch``.

    Progress events (a checkpoint or cache record appearing) place the kills in the work itself whatever the
    machine's load; wall-clock times alone landed mostly in the imports or after the end on a loaded machine.
    """
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=work, env=_env(work),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mid_write, seen, fired = False, set(), None
    while proc.poll() is None:
        now = time.time() - start
        if after is not None and now >= after:
            break
        if event is not None:
            if fired is None and event():
                fired = now
            if fired is not None and now >= fired + delay:
                break
        if watch is not None and watch.is_dir():
            seen |= {e.name for e in os.scandir(watch) if e.name.endswith(".tmp")}
            if len(seen) >= nth_write:
                mid_write = True
                break
        time.sleep(0.001 if watch is not None else 0.01)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    left_tmp = watch is not None and watch.is_dir() and any(e.name.endswith(".tmp") for e in os.scandir(watch))
    return {"killed_after_s": round(time.time() - start, 2), "finished_before_kill": finished,
            "killed_mid_write": bool(mid_write and left_tmp)}


def _timed(script: str, args: list[str], work: Path, watch: Path) -> tuple[float, float]:
    """Run the uninterrupted reference; return (seconds until its first file appears in ``watch``, total seconds)."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=work, env=_env(work),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and watch.is_dir() and any(watch.rglob("*")):
            first = time.time() - start
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed ({proc.returncode}):\n{proc.stderr.read()[-2000:]}")
    total = time.time() - start
    return (first if first is not None else total / 2), total


def _check_files(folder: Path) -> dict:
    """Count the files a killed job left that cannot be read (must be 0) and its leftover temporary files."""
    import torch
    from safetensors.torch import load_file

    from jobs.evaluate import _load_cached

    corrupt, checked = [], 0
    for p in folder.rglob("*"):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        try:
            if p.suffix == ".ckpt":
                checked += 1
                ckpt = torch.load(p, map_location="cpu", weights_only=True)
                assert isinstance(ckpt.get("state_dict"), dict)
            elif p.suffix == ".safetensors":
                checked += 1
                load_file(str(p))
            elif p.suffix == ".json":
                checked += 1
                json.loads(p.read_text())
                if "eval_cache" in p.parts:
                    assert _load_cached(p) is not None
        except Exception as err:  # noqa: BLE001 - any failure to read is what we count
            corrupt.append(f"{p}: {type(err).__name__}")
    tmp = [str(p) for p in folder.rglob("*.tmp")]
    return {"files_checked": checked, "corrupt": corrupt, "temp_files_left": len(tmp)}


def _weights_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return float("inf")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if ta[k].numel())


def soak_training(work: Path, data_root: str, n: int, rng: random.Random) -> list[dict]:
    ref = work / "train_ref"
    args = [*TRAIN, f"data.root={data_root}"]
    first, duration = _timed("train.py", [*args, f"hydra.run.dir={ref}"], work, ref / "checkpoints")
    epoch_s = (duration - first) / 2  # epochs 2 and 3 (and the export) came after the first checkpoint
    ref_metrics = json.loads((ref / "metrics.json").read_text())["metrics"]
    trials = []
    for i in range(n):
        killed, resumed = work / f"train_{i:02d}" / "killed", work / f"train_{i:02d}" / "resumed"
        during_write = i % 2 == 1  # every other kill waits for a checkpoint write in progress
        if during_write:
            info = _kill_at("train.py", [*args, f"hydra.run.dir={killed}"], work, watch=killed / "checkpoints",
                            nth_write=rng.randint(1, 5))
        else:  # a random point of a random epoch: after its start (fit start, or the previous epoch's checkpoint)
            k = rng.randint(0, 2)
            started = (lambda k=k, d=killed: (d / "csv").is_dir() and (k == 0 or len(
                [f for f in (d / "checkpoints").glob("epoch_*.ckpt")]) >= k))
            info = _kill_at("train.py", [*args, f"hydra.run.dir={killed}"], work, event=started,
                            delay=rng.uniform(0, epoch_s))
            info["epoch_killed_in"] = k
        files = _check_files(killed)
        last = killed / "checkpoints" / "last.ckpt"
        resume = [f"ckpt_path={last}"] if last.is_file() else []
        if (killed / "metrics.json").is_file():  # killed after the run had finished (while exporting/exiting)
            resumed, resume = killed, []
        else:
            _run("train.py", [*args, f"hydra.run.dir={resumed}", *resume], work)
        metrics = json.loads((resumed / "metrics.json").read_text())["metrics"]
        diff = _weights_diff(ref / "model.safetensors", resumed / "model.safetensors")
        trials.append({"trial": i, "kind": "during checkpoint write" if during_write else "random time", **info,
                       "resumed_from": str(last) if resume else None,
                       "finished_before_kill_signal": info["finished_before_kill"] or resumed == killed, **files, "max_weight_diff": diff,
                       "same_metrics": all(abs(metrics[k] - ref_metrics[k]) <= 1e-6 * max(1.0, abs(ref_metrics[k]))
                                           for k in ("val/acc", "val/ce", "train/psi_integral")),
                       "same_weights": diff <= 1e-5})
        print(json.dumps(trials[-1]), flush=True)
    return trials


def soak_evaluation(work: Path, data_root: str, n: int, rng: random.Random) -> list[dict]:
    import torch

    from robustx.io.export import save_model
    from robustx.models import SmallCNN

    torch.manual_seed(0)
    cfg = {"_target_": "robustx.models.SmallCNN", "channels": [8, 8, 8], "hidden": 16}
    ckpt = save_model(SmallCNN(channels=(8, 8, 8), hidden=16), work / "eval_model.safetensors", model_config=cfg)
    common = [f"ckpt={ckpt}", *EVAL, f"data.root={data_root}"]
    first, duration = _timed("eval.py", [*common, f"paths.log_dir={work / 'eval_ref_cache'}",
                                          f"hydra.run.dir={work / 'eval_ref'}"], work, work / "eval_ref_cache" / "eval_cache")
    ref = json.loads((work / "eval_ref" / "eval_model.json").read_text())
    units = len(list((work / "eval_ref_cache" / "eval_cache").glob("*/*.json")))
    unit_s = (duration - first) / units
    trials = []
    for i in range(n):
        cache_root = work / f"eval_{i:02d}"
        args = [*common, f"paths.log_dir={cache_root}", f"hydra.run.dir={cache_root / 'out'}"]
        k = rng.randint(1, units)  # after a random number of the cache records (batch x criterion/attack)
        records = (lambda k=k, d=cache_root: len(list((d / "eval_cache").glob("*/*.json"))) >= k)
        info = _kill_at("eval.py", args, work, event=records, delay=rng.uniform(0, unit_s))
        info["records_before_kill"] = k
        files = _check_files(cache_root)
        proc = _run("eval.py", args, work)
        res = json.loads((cache_root / "out" / "eval_model.json").read_text())
        same = all(res[m]["r"] == ref[m]["r"] for m in ("attack", "btr")) and res["accuracy"] == ref["accuracy"]
        resumed = next((ln.split("resumed ", 1)[1].split(" from")[0] for ln in (proc.stdout + proc.stderr).splitlines()
                        if "resumed " in ln), "0 batches")
        trials.append({"trial": i, "kind": "evaluation", **info, **files, "resumed": resumed, "same_r_i": same})
        print(json.dumps(trials[-1]), flush=True)
    return trials


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-kills", type=int, default=10)
    p.add_argument("--eval-kills", type=int, default=10)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets" / "fashion-mnist"))
    p.add_argument("--workdir", default="/tmp/robustx-fault-soak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the figures")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(a.seed)
    start = time.time()
    train = soak_training(work, a.data_root, a.train_kills, rng)
    evals = soak_evaluation(work, a.data_root, a.eval_kills, rng)
    rows = []
    for kind in ("random time", "during checkpoint write", "evaluation"):
        ts = [t for t in train + evals if t["kind"] == kind]
        if not ts:
            continue
        ok = [t.get("same_weights", True) and t.get("same_metrics", True) and t.get("same_r_i", True) for t in ts]
        rows.append({"kind": kind, "kills": len(ts), "finished_before_kill": sum(t.get("finished_before_kill_signal", t["finished_before_kill"]) for t in ts),
                     "killed_mid_write": sum(t["killed_mid_write"] for t in ts),
                     "resumed_equal": sum(ok), "corrupt_files": sum(len(t["corrupt"]) for t in ts),
                     "files_checked": sum(t["files_checked"] for t in ts),
                     "temp_files_left": sum(t["temp_files_left"] for t in ts)})
    print(f"\n{'kind':<26} {'kills':>5} {'mid-write':>9} {'resumed = reference':>20} {'files checked':>13} "
          f"{'corrupt':>7} {'temp left':>9}")
    for r in rows:
        print(f"{r['kind']:<26} {r['kills']:>5} {r['killed_mid_write']:>9} {r['resumed_equal']:>17}/{r['kills']:<2} "
              f"{r['files_checked']:>13} {r['corrupt_files']:>7} {r['temp_files_left']:>9}")
    summary = {"command": "python scripts/fault_soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "seconds": round(time.time() - start), "rows": rows, "trials": train + evals}
    if a.out:
        from robustx.io.files import atomic_write_json

        atomic_write_json(a.out, summary, indent=1)
    if any(r["corrupt_files"] or r["resumed_equal"] < r["kills"] for r in rows):
        raise SystemExit("some resumed run differs from the reference or a file was corrupt: see above")


if __name__ == "__main__":
    main()
