#!/usr/bin/env bash
# Issue 19's device check, one call: the paper preset through every data path with the new step and the old one
# side by side (samples/s, % of the fast model-only rate, MFU, peak device memory), the CPU preset on the card,
# and a short loss curve of --fast on against off. Everything it prints lands in $OUT.
#
# Prepare on the dev VM (the GPU image has no isal, webdataset nor braceexpand; CPython 3.12 there):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps -d .whl \
#       isal webdataset braceexpand timm==1.0.31
# then call the device tool with carry [".whl"] and the command
#   BENCH_S=420 CURVE_S=120 bash docs/results/gpu/issue19.sh
# (timeout_s 570: leaves room for one rerun inside the 15-minute budget). On the CPU, TOY=1 runs the same steps
# at a toy size (the CPU preset, a few steps), which is how this script was checked before it went to a device.
set -u
OUT=${OUT:-/tmp/issue19-out}
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
    BENCH="--preset cpu --train-steps 40 --loader-seconds 1"
    CURVE="--classes 16 --size 64 --steps 20 --img 32"
else
    BENCH="--preset paper --train-steps 60 --stream-images 5000 --loader-seconds 5 --compile-modes default,reduce-overhead"
    CURVE="--classes 1000 --size 512 --steps 300 --img 224"
fi
# shellcheck disable=SC2086
timeout "${BENCH_S:-420}" $PY bench.py --only trainer $BENCH 2>&1 | tee "$OUT/bench.log"
# The loss curve: the same seeds eager and fast; the fast step must train what the eager one trains.
set -- $CURVE
classes=$2 size=$4 steps=$6 img=$8
$PY -m fracgen render --classes "$classes" --size "$size" --out /tmp/issue19-shards --resume >/dev/null 2>&1
for fast in off on; do
    extra=$([ "$img" = 224 ] && echo "--preset paper --global-batch 256" || echo "--img-size $img --batch 32")
    # shellcheck disable=SC2086
    timeout "${CURVE_S:-120}" $PY -m train.pretrain --shards /tmp/issue19-shards --out "/tmp/issue19-$fast" \
        --steps "$steps" --log-every 20 --eval-every 0 --ckpt-every 0 --fast "$fast" $extra 2>&1 \
        | tee "$OUT/curve-$fast.log" | grep -v "^step " | tail -3
    rm -rf "/tmp/issue19-$fast"
done
ls -la "$OUT"
