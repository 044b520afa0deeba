#!/usr/bin/env bash
# Everything a GPU session should run, one device call per step (each fits the 10-minute limit).
#
# Here, once:   bash ../shared/gpu/prepare-wheels.sh          # diffusers wheels -> .whl/ (+ ORT pieces -> .ortc/)
# On the device (carry .whl), for STEP in tests, bench, ort:
#               bash bench/gpu_session.sh STEP
#
#   tests  pytest -m gpu: torch CUDA fp16 vs CPU fp32, compile + CUDA graphs, batch invariance on
#          CUDA, ORT CUDA IO binding (skips unless onnxruntime-gpu is installed), real TensorRT
#          (skips: TensorRT is not installable on the project's machines)
#   bench  bench/bench_speed.py: reference loop vs diffcls, SD-2.1-base shapes, fp16, batch 32
#   ort    bench/bench_ort_gpu.py: ORT CUDA EP plain / fused fp16 vs torch (needs onnxruntime-gpu
#          assembled from .ortc/ first, see ../shared/gpu/README.md)
#
# Results (text and JSON) go to $OUT.
set -euo pipefail
step="${1:?usage: bash bench/gpu_session.sh tests|bench|ort}"
OUT="${OUT:-/tmp/diffcls-gpu-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

case "$step" in
tests)
    python3 -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_trt.py 2>&1 | tee "$OUT/pytest_gpu.txt"
    ;;
bench)
    python3 bench/bench_speed.py --images 6 --batch-size 32 --json "$OUT/bench_speed.json" 2>&1 | tee "$OUT/bench_speed.txt"
    ;;
ort)
    python3 bench/bench_ort_gpu.py --json "$OUT/bench_ort_gpu.json" 2>&1 | tee "$OUT/bench_ort_gpu.txt"
    ;;
*)
    echo "unknown step $step (tests, bench or ort)" >&2
    exit 2
    ;;
esac
