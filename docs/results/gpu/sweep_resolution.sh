#!/usr/bin/env bash
# `make sweep-resolution` on one H200 in one device call (docs/results.md, "make sweep-resolution: the plan"), from
# the repository root:   bash docs/results/gpu/sweep_resolution.sh      (the device tool: timeout_s 600, carry .whl)
# .whl/ holds the wheels the GPU image lacks (isal, webdataset, braceexpand, timm 1.0.31 for CPython 3.12, as in
# run.sh); without it the installed packages are used. The runner plans its 24 runs into an 8-minute time box and
# starts none that would end past it; each finished run's row lands in RESULTS/rows/ as it finishes.
# Writes to $OUT: sweep.log (everything printed: the plan, each run's end, the tables), sweep-resolution.md,
# results.tgz (RESULTS' tables, plot and rows, paths from the repository root: `tar xzf results.tgz` there and
# commit) and logs.tgz (each run's own log). A later call reruns only what has no row yet.
# TOY=1: a rehearsal at toy size, on a CPU too (tests/test_resolution_sweep.py); ROOT, RESULTS, TIME_BOX, LIMIT and
# PYTHON may be set. EXPERIMENT=score-bases runs `make score-bases` the same way (17 runs, 9 side by side, in the
# same 8-minute box; its correlation table is score-bases-correlation.md).
set -u
OUT=${OUT:?set OUT to the folder that receives the results}
if [ "${TOY:-0}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then  # the GPU image's wheels (CPython 3.12); not for a CPU rehearsal
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
EXPERIMENT=${EXPERIMENT:-sweep-resolution}
ROOT=${ROOT:-/tmp/$EXPERIMENT}
RESULTS=${RESULTS:-docs/results}
# The hard limit (8 min 40 s) lets runs started inside the 8-minute box end 40 s past their estimate, and leaves
# the install and the tables room inside the device call's 10 minutes.
if [ "${TOY:-0}" = 1 ]; then
    ARGS=(--toy --jobs 2 --time-box "${TIME_BOX:-20}")
    [ "$EXPERIMENT" = sweep-resolution ] && ARGS+=(--resolutions 32)
    LIMIT=${LIMIT:-1200}
else
    ARGS=(--time-box "${TIME_BOX:-8}")
    LIMIT=${LIMIT:-520}
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
    "$PY" -c "import os, torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cores', \
os.cpu_count())"
    date -u
    timeout --kill-after=10 "$LIMIT" "$PY" -m train.experiments "$EXPERIMENT" --root "$ROOT" \
        --results "$RESULTS" "${ARGS[@]}"
    echo "runner exit status $?"
    date -u
    # the tables again from every finished run (kept rows too), also when the limit cut the runner short
    "$PY" -m train.experiments "$EXPERIMENT" --root "$ROOT" --results "$RESULTS" "${ARGS[@]}" --finished-only
} 2>&1 | tee "$OUT/sweep.log" | grep -v "^step \|^seed \|^\[rank"
cp "$RESULTS/$EXPERIMENT"*.md "$OUT/" 2>/dev/null
tar czf "$OUT/results.tgz" "$RESULTS/$EXPERIMENT".* "$RESULTS/$EXPERIMENT"-* "$RESULTS/rows" 2>/dev/null
(cd "$ROOT" && tar czf "$OUT/logs.tgz" --exclude=data ./*/log.txt 2>/dev/null)
ls -la "$OUT"
