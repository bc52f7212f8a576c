#!/usr/bin/env bash
# Train the demo (robust method) in fp32 and in bf16-mixed, then measure both with the same ARA
# evaluation (final callback pass: 200 validation images, 100 steps, eps 5). Usage: bash bench/compare_precision.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/precision/fp32_vs_bf16}
for p in 32-true bf16-mixed; do
  .venv/bin/python train.py +experiment=demo logger=csv trainer.enable_progress_bar=false trainer.precision=$p \
    callbacks=ara callbacks.ara_evaluation.every_n_epochs=0 callbacks.ara_evaluation.final_num_images=200 \
    callbacks.ara_evaluation.final_steps=100 callbacks.ara_evaluation.final_eps=5 callbacks.ara_evaluation.final_momentum=0.9 \
    hydra.run.dir=$OUT/$p
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| precision | test acc | val acc | ARA attack [95% CI] | ARA BTR [95% CI] | train s | s/step |")
print("|---|---|---|---|---|---|---|")
for p in ("32-true", "bf16-mixed"):
    m = json.load(open(f"{out}/{p}/metrics.json")); a = json.load(open(f"{out}/{p}/ara_final.json"))
    print(f"| {p} | {m['metrics']['test/acc']:.4f} | {m['metrics']['val/acc']:.4f} | {a['attack/ara']:.5f} [{a['attack/ara_ci_low']:.5f}, {a['attack/ara_ci_high']:.5f}] "
          f"| {a['btr/ara']:.5f} [{a['btr/ara_ci_low']:.5f}, {a['btr/ara_ci_high']:.5f}] | {m['train_seconds']:.0f} | {m['seconds_per_step']:.3f} |")
PY
