#!/usr/bin/env bash
# Issue 37's device check, one call (~7 minutes on an H100/H200): the paper preset's step as one graph.
#   1. bench rows, old beside new: the model alone eager, compiled with reduce-overhead, and captured as one CUDA
#      graph; in memory with the eager step, the compiled step uncaptured, and the captured step (the default);
#      streaming (workers cut crops); on the fly; the CPU preset on the card, eager and default; then the
#      augmentation of one batch of 256 eager against compiled whole.
#   2. a profile of 20 in-memory steps (top kernels, the share of the window the card is busy), after 20 steps run
#      under torch.cuda.set_sync_debug_mode("error") (a step that waits for the device raises): captured, then
#      with --graph off.
#   3. the loss curve: 300 steps of the paper preset with --fast off and with the default, same seeds.
# Everything it prints lands in $OUT.
#
# Prepare on the dev VM (the GPU image has no isal, webdataset nor braceexpand; CPython 3.12 there):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps -d .whl \
#       isal webdataset braceexpand timm==1.0.31
# then call the device tool with carry [".whl"], timeout_s 500 and the command
#   bash docs/results/gpu/issue37.sh
# On the CPU, TOY=1 runs the same steps at a toy size (the CPU preset, a few steps): how this script is checked
# before it goes to a device (tests/test_device_scripts.py runs it).
set -u
OUT=${OUT:-/tmp/issue37-out}
mkdir -p "$OUT"
if [ "${TOY:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then  # the GPU image's wheels; not for a CPU rehearsal
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  $PY -c "import torch, timm, os; print('torch', torch.__version__, 'timm', timm.__version__, 'cores', os.cpu_count())"
  git log -1 --format='fracgen at %h %cs' 2>/dev/null; date -u; } | tee "$OUT/machine.txt"
if [ "${TOY:-0}" = 1 ]; then
    BENCH="--preset cpu --train-steps 40 --precisions fp32 --paths memory --training-only"
    PROFILE="--preset cpu --profile-images 64"
    CURVE="--classes 16 --size 64 --steps 20 --img 32"
else
    BENCH="--preset paper --train-steps 60 --stream-images 5000 --loader-seconds 3 --compile-modes reduce-overhead
           --paths memory,stream,fly"
    PROFILE="--preset paper"
    CURVE="--classes 1000 --size 512 --steps 300 --img 224"
fi
# 1. The bench rows print as they are measured; a timeout keeps the ones that finished.
# shellcheck disable=SC2086
timeout "${BENCH_S:-270}" $PY bench.py --only trainer $BENCH 2>&1 | tee "$OUT/bench.log"
# 2. The profile and the sync check, captured and uncaptured.
for graph in auto off; do
    # shellcheck disable=SC2086
    timeout "${PROFILE_S:-60}" $PY -c "
import sys
from train.bench import step_checks
preset = sys.argv[1]
images = int(sys.argv[2]) if len(sys.argv) > 2 else 0
print('\n'.join(step_checks(preset, graph='$graph', images=images)))
" $(echo $PROFILE | sed 's/--preset //; s/--profile-images //') 2>&1 | tee "$OUT/profile-graph-$graph.log"
done
# 3. The loss curve: the same seeds eager and with the default step; the new step must train what the eager one
# trains.
set -- $CURVE
classes=$2 size=$4 steps=$6 img=$8
$PY -m fracgen render --classes "$classes" --size "$size" --out /tmp/issue37-shards --resume >/dev/null 2>&1
for fast in off auto; do
    extra=$([ "$img" = 224 ] && echo "--preset paper --global-batch 256" || echo "--img-size $img --batch 32")
    # shellcheck disable=SC2086
    timeout "${CURVE_S:-100}" $PY -m train.pretrain --shards /tmp/issue37-shards --out "/tmp/issue37-$fast" \
        --steps "$steps" --log-every 20 --eval-every 0 --ckpt-every 0 --fast "$fast" $extra 2>&1 \
        | tee "$OUT/curve-$fast.log" | grep -v "^step [0-9]" | tail -4
    rm -rf "/tmp/issue37-$fast"
done
ls -la "$OUT"
