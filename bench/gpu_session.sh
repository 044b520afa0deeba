#!/usr/bin/env bash
# Everything a GPU session should run, one device call per step (each fits the 10-minute limit).
#
# Here, once:   put the diffusers wheels in .whl/ (+ the onnxruntime-gpu wheel in 60 MiB pieces in .ortc/)
# On the device (carry .whl), for STEP in tests, bench, ort:
#               bash bench/gpu_session.sh STEP
#
#   tests  pytest -m gpu: torch CUDA fp16 vs CPU fp32, compile + CUDA graphs, batch invariance on
#          CUDA, ORT CUDA IO binding (skips unless onnxruntime-gpu is installed), real TensorRT
#          (skips: TensorRT is not installable on the project's machines)
#   bench  bench/bench_speed.py: reference loop vs diffcls, SD-2.1-base shapes, fp16, batch 32
#   ort    bench/bench_ort_gpu.py: ORT CUDA EP plain / fused fp16 vs torch (needs onnxruntime-gpu
#          assembled from .ortc/ first, see bench/gpu_prepare_ort.sh)
#   all    the steps in ONE call, in the order of GPU_STEPS (default "pytest_gpu ort sd21"), each
#          under a timeout cut to what is left of GPU_BUDGET_S (default 540 s): pytest_gpu
#          (pytest -m gpu), ort (bench_ort_gpu.py), sd21 (bench_speed.py: reference, eager,
#          compiled, adaptive, VAE check), demo (the demo model on all 359 held-out digits clean
#          and at corruption 4: paper schedule, demo default, --adaptive, 100-timestep tables for
#          bench/policy_replay.py; ran on 2026-11-26, so not in the default list),
#          table_SET_sSEED (e.g. table_c4_s1: every prompt at all TABLE_N=500 grid timesteps on the
#          held-out digits at corruption SET (c0 = clean) with noise seed SEED -> $OUT/table_c4_s1.npz),
#          paper_SET_sSEED / adaptive_SET_sSEED / demodef_SET_sSEED (one live evaluate run: the paper
#          schedule, --adaptive with its defaults, the demo model's default schedule; CSV + JSON in logs).
#          Unpacks /tmp/ortx.tar.xz (onnxruntime-gpu's wheel contents as .tar.xz, carried in
#          <= 48.5 MiB pieces .ortx/p0..p3 by earlier calls: cat .ortx/pN >> /tmp/ortx.tar.xz)
#          when present. Everything lands in $OUT: logs.tgz (text, JSON, CSV) and one .jsonl.gz
#          per error table (each under the 16 MiB a returned file may have).
#
# Results (text and JSON) go to $OUT.
set -euo pipefail
step="${1:?usage: bash bench/gpu_session.sh tests|bench|ort|all}"
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
all)
    budget="${GPU_BUDGET_S:-540}"
    t_start=$(date +%s)
    W=/tmp/diffcls-all; rm -rf "$W"; mkdir -p "$W/logs"
    cp "$OUT/gpu.txt" "$W/logs/"
    if [ -f /tmp/ortx.tar.xz ]; then  # onnxruntime-gpu, unpacked wheel contents (see .ortx below)
        python3 -c "import tarfile; tarfile.open('/tmp/ortx.tar.xz').extractall('/tmp/site')" || echo "onnxruntime-gpu unpack failed"
    fi
    python3 - > "$W/logs/versions.txt" 2>&1 <<'PY' || true
import importlib
for name in ("torch", "onnxruntime", "diffusers", "transformers", "numpy", "typer", "sklearn"):
    try:
        m = importlib.import_module(name)
        extra = m.get_available_providers() if name == "onnxruntime" else ""
        print(name, getattr(m, "__version__", "?"), extra)
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
PY
    cat "$W/logs/versions.txt"
    pack() {
        mkdir -p "$W/logs/csv"; cp "$W"/tables_demo/*.csv "$W/logs/csv/" 2>/dev/null || true
        tar czf "$OUT/logs.tgz" -C "$W" logs
        for t in "$W"/tables_demo/*.jsonl; do
            [ -f "$t" ] && [ ! -f "$OUT/$(basename "$t").gz" ] && gzip -6 -c "$t" > "$OUT/$(basename "$t").gz"
        done
        return 0
    }
    step() {  # step NAME MAX_SECONDS CMD...: run under a timeout cut to the budget left
        local name=$1 cap=$2; shift 2
        local left=$(( budget - ($(date +%s) - t_start) - 10 ))
        local lim=$(( cap < left ? cap : left ))
        if [ "$lim" -lt 20 ]; then echo "SKIP $name (${left}s left)" | tee -a "$W/logs/steps.txt"; return 0; fi
        local t0=$(date +%s)
        echo "=== $name (limit ${lim}s) ===" | tee -a "$W/logs/steps.txt"
        set +e
        timeout -k 5 "$lim" "$@" > "$W/logs/$name.txt" 2>&1
        local rc=$?
        set -e
        tail -n 25 "$W/logs/$name.txt"
        echo "=== $name rc=$rc $(( $(date +%s) - t0 ))s ===" | tee -a "$W/logs/steps.txt"
        pack
    }
    export PYTHONUNBUFFERED=1 W
    # GPU_DRYRUN=1: the same steps on a CPU with tiny inputs (checks this script, not the GPU)
    if [ -n "${GPU_DRYRUN:-}" ]; then
        export DEV=cpu LIMIT="--limit 12" BS=64 SD21="--tiny --variants eager,adaptive" ORT_ARGS="--tiny"
    else
        export DEV=cuda LIMIT="" BS=500 SD21="--images 4 --batch-size 32" ORT_ARGS=""
    fi
    demo() {  # the demo model on CUDA in IEEE fp32 (--precision fp32), 359 held-out digits
        set -e
        local D="$W/tables_demo"; mkdir -p "$D"
        # shellcheck disable=SC2086
        python3 -m diffcls digits "$W/held_c0" --split heldout $LIMIT
        # shellcheck disable=SC2086
        python3 -m diffcls digits "$W/held_c4" --split heldout --corrupt 4 $LIMIT
        local common=(--device "$DEV" --precision fp32 --no-cache --batch-size "$BS")
        for s in c0 c4; do
            python3 -m diffcls evaluate "$W/held_$s" "${common[@]}" --n-samples "50 500" --to-keep "5 1" \
                --out "$D/paper_$s.csv" --json "$W/logs/paper_$s.json" --save-errors "$D/paper_$s.jsonl"
            python3 -m diffcls evaluate "$W/held_$s" "${common[@]}" --out "$D/demo_$s.csv" --json "$W/logs/demo_$s.json"
            python3 -m diffcls evaluate "$W/held_$s" "${common[@]}" --adaptive --out "$D/adapt_$s.csv" --json "$W/logs/adapt_$s.json"
        done
        for s in c0 c4; do
            python3 -m diffcls evaluate "$W/held_$s" "${common[@]}" --n-samples 100 --to-keep 1 \
                --out "$D/grid_$s.csv" --json "$W/logs/grid_$s.json" --save-errors "$D/grid_$s.jsonl"
        done
    }
    # every prompt at every timestep of a TABLE_N-point grid (default 500, the paper's fine grid)
    # for one held-out set and noise seed, packed to $OUT/table_SET_sSEED.npz (7 MB) for
    # bench/policy_replay.py: the 500-timestep tables issue 10's final-stage design needs
    held() {  # held SET: the held-out digits at corruption SET (c0 = clean) under $W/held_SET
        if [ ! -d "$W/held_$1" ]; then
            local corrupt=(); [ "$1" != c0 ] && corrupt=(--corrupt "${1#c}")
            # shellcheck disable=SC2086
            python3 -m diffcls digits "$W/held_$1" --split heldout "${corrupt[@]}" $LIMIT
        fi
    }
    live() {  # live NAME SET SEED ARGS...: one evaluate run, CSV and JSON into the logs
        set -e
        local name=$1 set=$2 seed=$3; shift 3
        held "$set"
        python3 -m diffcls evaluate "$W/held_$set" --device "$DEV" --precision fp32 --no-cache --batch-size "$BS" \
            --seed "$seed" "$@" --out "$W/logs/${name}_${set}_s$seed.csv" --json "$W/logs/${name}_${set}_s$seed.json"
    }
    table() {  # table SET SEED, SET in c0 c3 c4 ...
        set -e
        local set=$1 seed=$2 D="$W/tables_500"; mkdir -p "$D"
        held "$set"
        python3 -m diffcls evaluate "$W/held_$set" --device "$DEV" --precision fp32 --no-cache --batch-size "$BS" \
            --seed "$seed" --n-samples "${TABLE_N:-500}" --to-keep 1 --out "$D/t_${set}_s$seed.csv" \
            --json "$W/logs/table_${set}_s$seed.json" --save-errors "$D/t_${set}_s$seed.jsonl"
        python3 bench/policy_replay.py pack "$D/t_${set}_s$seed.jsonl" "$OUT/table_${set}_s$seed.npz"
        rm -f "$D/t_${set}_s$seed.jsonl"
    }
    paper() {  # paper SET SEED: the paper's CIFAR-10 schedule live on the same images and noise seed
        set -e
        live paper "$1" "$2" --n-samples "50 500" --to-keep "5 1"
    }
    # order: what the last session (2026-11-26, H200) left unverified first: the ORT CUDA fixes
    # (pytest), ORT's SD-2.1 speeds, then the torch paths again; GPU_STEPS picks and orders them
    export -f held live table paper
    for s in ${GPU_STEPS:-pytest_gpu ort sd21}; do
        IFS=_ read -r _ tset tseed <<< "$s"  # NAME_SET_sSEED steps: the set and the seed
        case "$s" in
        # shellcheck disable=SC2086
        sd21) step sd21 270 python3 bench/bench_speed.py $SD21 --json "$W/logs/bench_speed.json" ;;
        pytest_gpu) step pytest_gpu 170 python3 -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_trt.py tests/test_exact_fp32.py ;;
        # shellcheck disable=SC2086
        ort) step ort 330 python3 bench/bench_ort_gpu.py $ORT_ARGS --json "$W/logs/bench_ort_gpu.json" ;;
        demo) export -f demo; step demo 200 bash -c demo ;;
        adaptive_*) step "$s" 100 bash -c "live adaptive $tset ${tseed#s} --adaptive" ;;
        demodef_*) step "$s" 100 bash -c "live demodef $tset ${tseed#s}" ;;
        paper_*) step "$s" 100 bash -c "paper $tset ${tseed#s}" ;;
        table_*) step "$s" 150 bash -c "table $tset ${tseed#s}" ;;
        *) echo "unknown step $s in GPU_STEPS (pytest_gpu, ort, sd21, demo, table_SET_sSEED, paper_SET_sSEED, adaptive_SET_sSEED, demodef_SET_sSEED)" | tee -a "$W/logs/steps.txt" ;;
        esac
    done
    pack
    ls -la "$OUT"
    ;;
*)
    echo "unknown step $step (tests, bench, ort or all)" >&2
    exit 2
    ;;
esac
