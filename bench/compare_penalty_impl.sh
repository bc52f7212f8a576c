#!/usr/bin/env bash
# Train the demo (robust method) with the paper's double-backprop penalty and with the
# finite-difference option (fp32 and bf16-mixed), then measure each with the same ARA evaluation
# (final callback pass: 200 validation images, 100 steps, eps 5, momentum 0.9); the last run adds
# channels_last, the fastest robust path of bench/bench_train_step.py; the double_backprop_fused runs
# train with the same exact gradient through robustx.training.double_backprop's kernels.
# Usage: bash bench/compare_penalty_impl.sh [OUT]   (runs already in OUT are kept; delete OUT to redo them)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/penalty_implementations/penalty_impl}
run() {  # name precision impl [channels_last] [fd_h]
  if [ -f "$OUT/$1/ara_final.json" ]; then echo "$1: done before, kept"; return; fi
  .venv/bin/python train.py +experiment=demo logger=csv trainer.enable_progress_bar=false trainer.precision=$2 \
    method.penalty_impl=$3 channels_last=${4:-false} method.fd_h=${5:-0.0005} callbacks=ara callbacks.ara_evaluation.every_n_epochs=0 callbacks.ara_evaluation.final_num_images=200 \
    callbacks.ara_evaluation.final_steps=100 callbacks.ara_evaluation.final_eps=5 callbacks.ara_evaluation.final_momentum=0.9 \
    hydra.run.dir=$OUT/$1
}
run double_backprop-32 32-true double_backprop
run finite_difference-32 32-true finite_difference
run double_backprop-bf16 bf16-mixed double_backprop
run finite_difference-bf16 bf16-mixed finite_difference
run finite_difference-bf16cl bf16-mixed finite_difference true
run finite_difference-bf16cl-h2e-3 bf16-mixed finite_difference true 0.002   # probe size that suits bf16 (bench/bench_fd_fidelity.py)
run double_backprop_fused-32 32-true double_backprop_fused
run double_backprop_fused-bf16cl bf16-mixed double_backprop_fused true
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| penalty | precision | test acc | val acc | final psi | ARA attack [95% CI] | ARA BTR [95% CI] | train s | s/step |")
print("|---|---|---|---|---|---|---|---|---|")
for name in ("double_backprop-32", "finite_difference-32", "double_backprop-bf16", "finite_difference-bf16", "finite_difference-bf16cl",
             "finite_difference-bf16cl-h2e-3", "double_backprop_fused-32", "double_backprop_fused-bf16cl"):
    impl, prec = name.split("-")[:2]
    prec = prec.replace("bf16cl", "bf16 + channels_last") + (", h=2e-3" if name.endswith("h2e-3") else "")
    m = json.load(open(f"{out}/{name}/metrics.json")); a = json.load(open(f"{out}/{name}/ara_final.json"))
    print(f"| {impl} | {prec} | {m['metrics']['test/acc']:.4f} | {m['metrics']['val/acc']:.4f} | {m['metrics'].get('train/psi', float('nan')):.0f} "
          f"| {a['attack/ara']:.5f} [{a['attack/ara_ci_low']:.5f}, {a['attack/ara_ci_high']:.5f}] "
          f"| {a['btr/ara']:.5f} [{a['btr/ara_ci_low']:.5f}, {a['btr/ara_ci_high']:.5f}] | {m['train_seconds']:.0f} | {m['seconds_per_step']:.3f} |")
PY
