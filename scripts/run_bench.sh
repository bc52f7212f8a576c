#!/usr/bin/env bash
# Robustness per compute on Fashion-MNIST (BENCHMARKS.md): the published run, sequentially, one thread.
#   bash scripts/run_bench.sh [BUDGET_MINUTES]        (published: 3)
# Writes logs/train/multiruns/bench_fashion_mnist/{main,sweep_robust,sweep_pgd}/<job>/bench.json,
# then the tables and plots in results/bench_fashion_mnist/.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-3}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-$(cd ../shared/datasets/fashion-mnist 2>/dev/null && pwd || echo null)}
OUT=${OUT:-logs/train/multiruns/bench_fashion_mnist}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=${WANDB_MODE:-offline}
# Evaluation actually used for the published run (see BENCHMARKS.md for why not the full paper
# protocol): 500 fixed test images, the paper's engine with the 'fast' settings (T=112, path 2,
# momentum 0.9, 10 fp32 bisection steps), bf16 search with fp32 re-check, ALMA 100 steps.
COMMON=(+experiment=bench_fashion_mnist data.root="$DATA" logger=csv bench.budget_minutes="$BUDGET"
        bench.num_images=500 bench.ara.protocol=fast bench.ara.bf16=true bench.cross_check.steps=100)
run() { local name=$1; shift; echo "== $name: $* ($(date +%T))"; /usr/bin/time -f "$name: %e s" \
        "$PY" train.py -m "${COMMON[@]}" hydra.sweep.dir="$OUT/$name" "$@"; }
run main method=standard,pgd,trades,adv_l2,robust,all
run sweep_robust method=robust method.l_target=0.5,1.0,2.0
run sweep_pgd method=pgd method.adversarial.eps=0.02,0.05
"$PY" scripts/summarize_runs.py "$OUT"/main "$OUT"/sweep_robust "$OUT"/sweep_pgd --out results/bench_fashion_mnist \
    --reference results/reference_ara_paper_200 results/reference_ara_paper_200_all
