#!/usr/bin/env bash
# GPU checks of the project, in one short script (CI has no GPU; run this where one is lent).
#
#   OUT=DIR DATA=DIR [PY=python3] [RUNS=DIR] [STEPS="tests eval bench train train_bf16"] bash scripts/gpu_check.sh
#
# DATA holds cifar10-jpeg/{train,test}.tar.gz and reference-checkpoints/*.pt (copies of
# ../shared). Each step has its own time limit and log in OUT; a failing step does not stop
# the others, and the script exits non-zero if any failed. Run folders go to RUNS
# (default /tmp/gpu_check_runs); their JSON, CSV, YAML and PNG files end up in OUT/results.tgz.
#   tests: tests/unit/test_cuda.py (the core on CUDA against the CPU, float64)
#   bench: bench/bench_train_step.py --device cuda (resnet44, batch 128; TF32 off)
#   train: train.py +experiment=cifar10_all on trainer=gpu, one short epoch with the ARA callback
#          (the final paper-protocol ARA on 200 images); train_bf16: the same in bf16-mixed
#   eval:  eval.py on the authors' four ResNet-44s, 1,000 CIFAR-10 test images, paper protocol
#          in fp32 (TF32 off), ALMA cross-check 1,000 steps
set -u
: "${OUT:?set OUT to a folder for logs and results}" "${DATA:?set DATA to a folder with cifar10-jpeg/ and reference-checkpoints/}"
PY=${PY:-python3}
STEPS=${STEPS:-"tests eval bench train train_bf16"}
RUNS=${RUNS:-/tmp/gpu_check_runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
failed=()

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" = 0 ] || failed+=("$name")
}

nvidia-smi -L
"$PY" -c 'import torch, pytorch_lightning as pl; print("torch", torch.__version__, "lightning", pl.__version__, torch.cuda.get_device_name(0))'

step tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py
R=$DATA/reference-checkpoints
# cache=true (the default): a killed eval resumes from its finished batches on the same machine.
step eval 300 "$PY" eval.py device=cuda "ckpt=[$R/resnet44-standard.pt,$R/resnet44-adv-train.pt,$R/resnet44-robust.pt,$R/resnet44-all.pt]" \
    "data.root=$DATA/cifar10-jpeg" ara.protocol=paper ara.num_images=1000 ara.batch_size=500 \
    ara.bf16=false ara.channels_last=false ara.compile=false 'cross_check.attacks=[alma]' cross_check.steps=1000 fixed_radius.version=none \
    hydra.run.dir="$RUNS/eval_reference_1000"
step bench 120 "$PY" bench/bench_train_step.py --device cuda --models resnet44 small_cnn --batch 128 --repeats 5 \
    --methods plain robust all "all (attack_subset)" --json "$OUT/train_step_gpu.json"
common=(+experiment=cifar10_all trainer=gpu logger=csv "data.root=$DATA/cifar10-jpeg" data.num_workers=4
        data.limit_train=2560 data.limit_val=500 data.limit_test=500 trainer.max_epochs=1 callbacks=ara
        callbacks.ara_evaluation.every_n_epochs=1 callbacks.ara_evaluation.final_num_images=200 export=true)
step train 150 "$PY" train.py "${common[@]}" hydra.run.dir="$RUNS/train_fp32"
step train_bf16 120 "$PY" train.py "${common[@]}" trainer.precision=bf16-mixed hydra.run.dir="$RUNS/train_bf16"

(cd "$RUNS" && find . -type f \( -name '*.json' -o -name '*.csv' -o -name '*.yaml' -o -name '*.png' -o -name '*.log' \) \
    -not -path '*/eval_cache/*' -print0 | tar czf "$OUT/results.tgz" --null -T -) && ls -la "$OUT"

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
