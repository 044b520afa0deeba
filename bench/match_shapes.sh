#!/usr/bin/env bash
# `diffcls match` with the bundled demo-shapes model on the shapes world (BENCHMARKS.md,
# "Compositional matching"). Run from the repository root; everything lands in $DIR (default
# $TMPDIR/diffcls-match), one log per step, so a killed step reruns and resumes its --out file.
#
#   bash bench/match_shapes.sh                 # all steps
#   STEPS="data full replay" bash bench/match_shapes.sh
#   INTERVAL=20 bash bench/match_shapes.sh     # a coarser grid (50 timesteps) when time is short
#
# Steps: data (600 train, heldout and novel quadruples), train (300 train-split items, full grid,
# errors saved: where match --adaptive's constants are chosen, with tune), engines (ONNX Runtime fp32 export: ~3x the
# torch backend's UNet evaluations/s on the project's CPU), full (heldout, full grid, errors saved),
# replay (bench/match_replay.py on them: agreement and cost of --adaptive settings), adaptive (a
# live match --adaptive run compared with the full grid), novel (the novel split, full grid).
set -euo pipefail
DIR=${DIR:-${TMPDIR:-/tmp}/diffcls-match}
INTERVAL=${INTERVAL:-5}
N=${N:-500}
STEPS=${STEPS:-"data engines train tune full replay adaptive novel"}
PY=${PY:-python}
mkdir -p "$DIR"
run() { echo "+ $*" | tee -a "$DIR/commands.txt"; "$@"; }
for step in $STEPS; do
  case $step in
    data)
      run $PY -m diffcls shapes "$DIR/heldout" --split heldout > "$DIR/data.log" 2>&1
      run $PY -m diffcls shapes "$DIR/novel" --split novel >> "$DIR/data.log" 2>&1
      run $PY -m diffcls shapes "$DIR/train" --split train >> "$DIR/data.log" 2>&1 ;;
    train)
      run $PY -m diffcls match "$DIR/train/quadruples.csv" --engines "$DIR/engines" --limit 300 --t-interval "$INTERVAL" \
        --threads 1 --out "$DIR/train-full-$INTERVAL.csv" --save-errors "$DIR/train-full-$INTERVAL.jsonl" > "$DIR/train-$INTERVAL.log" 2>&1 ;;
    tune)
      run $PY bench/match_replay.py "$DIR/train-full-$INTERVAL.jsonl" --separation --error-rate 0.9 0.8 0.7 0.5 0.2 0.05 \
        --min-samples 5 6 8 10 12 > "$DIR/tune-$INTERVAL.log" 2>&1 ;;
    engines)
      run $PY -m diffcls export --model demo-shapes --out "$DIR/engines" --batch-sizes 32 > "$DIR/engines.log" 2>&1 ;;
    full)
      run $PY -m diffcls match "$DIR/heldout/quadruples.csv" --engines "$DIR/engines" --limit "$N" --t-interval "$INTERVAL" \
        --threads 1 --out "$DIR/heldout-full-$INTERVAL.csv" --save-errors "$DIR/heldout-full-$INTERVAL.jsonl" \
        --json "$DIR/heldout-full-$INTERVAL.json" --plot "$DIR/heldout-full-$INTERVAL.png" > "$DIR/full-$INTERVAL.log" 2>&1 ;;
    replay)
      run $PY bench/match_replay.py "$DIR/heldout-full-$INTERVAL.jsonl" --separation --error-rate 0.8 0.05 --min-samples 6 8 \
        > "$DIR/replay-$INTERVAL.log" 2>&1 ;;
    adaptive)
      run $PY -m diffcls match "$DIR/heldout/quadruples.csv" --engines "$DIR/engines" --limit "$N" --t-interval "$INTERVAL" \
        --threads 1 --adaptive ${ADAPTIVE_FLAGS:-} --compare "$DIR/heldout-full-$INTERVAL.csv" --out "$DIR/heldout-adaptive-$INTERVAL.csv" \
        --json "$DIR/heldout-adaptive-$INTERVAL.json" > "$DIR/adaptive-$INTERVAL.log" 2>&1 ;;
    novel)
      run $PY -m diffcls match "$DIR/novel/quadruples.csv" --engines "$DIR/engines" --limit "$N" --t-interval "$INTERVAL" \
        --threads 1 --out "$DIR/novel-full-$INTERVAL.csv" --json "$DIR/novel-full-$INTERVAL.json" \
        --plot "$DIR/novel-full-$INTERVAL.png" > "$DIR/novel-$INTERVAL.log" 2>&1 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
