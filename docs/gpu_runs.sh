#!/usr/bin/env bash
# Issue 8, item 4: both recipes on the real 128x96 images at 112 px for 70 epochs, on one GPU
# lent through the `device` tool. Prepared and dry-run on CPU (tiny settings); see
# docs/gpu-runs.md for the preparation (wheels, the packed data) and the exact `run` call.
#
# Runs the seed's recipe (configs/cars_lowres.py) and the fast one (configs/fast30.py) side by
# side on the one GPU, each under a wall-clock cap, and leaves in $OUT each run's log and
# metrics.jsonl (what every finished epoch measured) plus the final report when it got there.
# Environment knobs (defaults are the real run): EPOCHS, SIZE, CAP_S (seconds per run), EXTRA
# (more --config flags, e.g. for a dry run), PY.
set -u
EPOCHS=${EPOCHS:-70} SIZE=${SIZE:-112} CAP_S=${CAP_S:-480} EXTRA=${EXTRA:-} PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! $PY -c 'import grain, ml_collections' 2>/dev/null; then     # the GPU image lacks these two
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo 'wheel install failed' | tee "$OUT/error.txt"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD    # run from the tree (its jax may be newer than the pin)
data=/tmp/cars128_data
mkdir -p "$data" && tar -xzf data/carry/cars128.tar.gz -C "$data" || exit 1
$PY -c 'import jax, flax, optax, orbax.checkpoint as o, grain; print("jax", jax.__version__,
"flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, jax.devices())' \
  2>&1 | tee "$OUT/versions.txt" || exit 1

run() {   # name config
  timeout --signal=INT "$CAP_S" $PY main.py --config="configs/$2.py" \
    --config.data_dir="$data/cars128" --config.image_size="$SIZE" --config.num_epochs="$EPOCHS" \
    --config.patience=100 --config.early_stopping_metric=val_accuracy $EXTRA \
    --workdir="/tmp/runs/$1" > "$OUT/$1.log" 2>&1
  echo "$1 exit $?" >> "$OUT/exit_codes.txt"
  cp "/tmp/runs/$1/metrics.jsonl" "$OUT/$1_metrics.jsonl" 2>/dev/null
  cp "/tmp/runs/$1/final_report.json" "$OUT/$1_final_report.json" 2>/dev/null
}
run seed112 cars_lowres &
run fast112 fast30 &
wait
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$OUT/versions.txt" 2>/dev/null
grep -h '^Epoch' "$OUT"/seed112.log | tail -3; grep -h '^Epoch' "$OUT"/fast112.log | tail -3
