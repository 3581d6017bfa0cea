# The device session of 2026-11-27 that wrote this folder (one NVIDIA H200), kept as it ran. Run from the repo root
# as .device/run.sh with `EXP_S=300 BENCH_S=100 TARGET=120 bash .device/run.sh`, carrying .whl/ (isal 1.9.1,
# webdataset 1.0.2, braceexpand 0.1.7, timm 1.0.31 wheels for CPython 3.12: the GPU image lacks the first three).
# The second call ran `python3 .device/longer.py 12000` under `timeout 330` (steps12000-partial.txt).
# the whole device session: install, versions, GPU-budget experiments, paper-preset bench; all output to $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, numba, sklearn, numpy; print('torch', torch.__version__, 'timm', timm.__version__, 'numba', numba.__version__, 'sklearn', sklearn.__version__, 'numpy', numpy.__version__, 'cores', __import__('os').cpu_count())"
date -u
timeout ${EXP_S:-300} python3 .device/gpu_check.py ${TARGET:-120} 2>&1 | tee $OUT/experiments.log | grep -v "^step \|^seed \|^\[rank"
date -u
timeout ${BENCH_S:-100} python3 bench.py --only trainer --preset paper --train-steps 60 --stream-images 5000 --loader-seconds 5 2>&1 | tee $OUT/bench.log
date -u
cd /tmp && tar czf $OUT/results.tgz --exclude='*.pt' --exclude='*.pth' --exclude='*.tar' --exclude='exp/data' exp res 2>/dev/null; ls -la $OUT
