#!/usr/bin/env bash
# Re-evaluate benchmark runs with the paper's full search protocol (T=450, path 20, momentum 0.9) on the
# same test images as their bench.json (eval.py draws them with the same fixed seed), and table the result
# against the benchmark's own (fast-protocol) numbers. Two lanes, one thread each. BENCHMARKS.md uses it.
#   MODE=btr (default): the BTR ARA.
#   MODE=attack: the Attack ARA plus the ALMA cross-check at ALMA_STEPS (default 1000) steps, and their ensemble.
#   [MODE=attack] OUT=logs/eval/paper500 bash scripts/recheck_paper_protocol.sh RUN_DIR [RUN_DIR...]   (RUN_DIR holds bench.json + model.safetensors)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/eval/paper500}
N=${N:-500}
MODE=${MODE:-btr}
ALMA_STEPS=${ALMA_STEPS:-1000}
case "$MODE" in
  btr) MODE_ARGS=('ara.modes=[btr]' 'cross_check.attacks=[]') ;;
  attack) MODE_ARGS=('ara.modes=[attack]' 'cross_check.attacks=[alma]' "cross_check.steps=$ALMA_STEPS") ;;
  *) echo "MODE=$MODE: unknown; use MODE=btr (BTR ARA) or MODE=attack (Attack ARA + ALMA ensemble)"; exit 2 ;;
esac
DATA=${DATA:-$(cd ../shared/datasets/fashion-mnist 2>/dev/null && pwd || echo null)}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=${WANDB_MODE:-offline}
[ $# -gt 0 ] || { echo "usage: OUT=DIR bash scripts/recheck_paper_protocol.sh RUN_DIR [RUN_DIR...]"; exit 2; }
for d in "$@"; do
  [ -f "$d/bench.json" ] && [ -f "$d/model.safetensors" ] || { echo "$d: no bench.json + model.safetensors there (a benchmark run folder is needed)"; exit 2; }
done
one() {
  local d=$1 name
  name=$(echo "${d%/}" | sed 's#^logs/train/multiruns/##' | tr '/' '_')
  "$PY" eval.py ckpt="$d/model.safetensors" data=fashion_mnist data.root="$DATA" ara.protocol=paper ara.num_images="$N" \
    "${MODE_ARGS[@]}" ara.threads=1 hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1 \
    && echo "$name: done" || { echo "$name: eval.py failed (see $OUT/$name.log)"; return 1; }
}
mkdir -p "$OUT"
lane() { local rc=0; for d in "$@"; do one "$d" || rc=1; done; return $rc; }
args=("$@"); a=(); b=()
for i in "${!args[@]}"; do if (( i % 2 == 0 )); then a+=("${args[$i]}"); else b+=("${args[$i]}"); fi; done
lane "${a[@]}" & pa=$!
if [ ${#b[@]} -gt 0 ]; then lane "${b[@]}" & pb=$!; wait $pb || true; fi
wait $pa || true
"$PY" - "$OUT" "$MODE" <<'EOF' | tee "$OUT/table.md"
import json, sys
from pathlib import Path
from jobs.summarize_runs import same_images
mode = sys.argv[2]
if mode == "btr":
    print("| run | method | seed | test acc | BTR ARA bench (its protocol) | BTR ARA paper [95% CI] | paper / bench | s |")
    print("|---|---|---|---|---|---|---|---|")
else:
    print("| run | method | seed | test acc | Attack ARA bench (its protocol) | Attack ARA paper search | ALMA alone (steps) | "
          "ensemble bench | ensemble paper + ALMA [95% CI] | ensemble / bench | ALMA < half paper r | s (search / ALMA) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(Path(sys.argv[1]).glob("*/model.json")):
    j = json.loads(f.read_text())
    run = Path(j["checkpoint"]).parent
    b = json.loads((run / "bench.json").read_text())
    e = b["eval"]
    if not same_images(j, ids_seed=e.get("ids_seed"), num_images=e["num_images"], accuracy=e["accuracy"]):
        print(f"<!-- {run}: not the benchmark's images (seed {j['data'].get('val_seed')} vs {e.get('ids_seed')}, "
              f"{j['num_images']} vs {e['num_images']} images, accuracy {j['accuracy']} vs {e['accuracy']}) -->")
    head = f"| {f.parent.name} | {b['method_name']} | {b.get('seed')} | {b['test_acc']:.4f} |"
    if mode == "btr":
        if "btr" not in j:
            continue
        fast, p = e["btr"]["ara"], j["btr"]
        print(f"{head} {fast:.4f} ({e['settings']['protocol']}) | "
              f"{p['ara']:.4f} [{p['ara_ci_low']:.4f}, {p['ara_ci_high']:.4f}] | {p['ara'] / fast:.3f} | {j['seconds']:.0f} |")
    else:
        if "ensemble" not in j or "alma" not in j.get("cross_check", {}):
            continue
        a, en, alma = j["attack"], j["ensemble"], j["cross_check"]["alma"]
        steps = alma.get("steps") or "-"
        print(f"{head} {e['attack']['ara']:.4f} ({e['settings']['protocol']}) | {a['ara']:.4f} | {alma['ara_attack']:.4f} ({steps}) | "
              f"{e['ensemble']['ara']:.4f} | {en['ara']:.4f} [{en['ara_ci_low']:.4f}, {en['ara_ci_high']:.4f}] | "
              f"{en['ara'] / e['ensemble']['ara']:.3f} | {100 * alma['share_much_smaller']:.1f}% | {j['seconds']:.0f} / {alma['seconds']:.0f} |")
EOF
