#!/usr/bin/env bash
# The seed's recipe (configs/cars_lowres.py) and configs/fast30.py side by side on one GPU at
# 112 px (the development copy's native 128x96, squashed) for 70 epochs, each under a wall-clock
# cap, every epoch run (the best checkpoint by validation accuracy; the seed's val-loss stopping
# point can be read off metrics.jsonl). Leaves in $OUT each run's log, metrics.jsonl and final
# report, the exit codes and the versions found.
#
#   DATA=<development copy (python -m cars_jax.data.lowres)> bash benchmarks/gpu_recipes.sh
#
# Knobs: EPOCHS (70), SIZE (112), CAP_S (seconds per run, 480; Ctrl-C at the cap keeps the
# finished epochs), EXTRA (more --config flags, e.g. a tiny net for a dry run on a CPU), PY, OUT.
set -u
: "${DATA:?set DATA to the development copy (python -m cars_jax.data.lowres --src=... --dst=...)}"
EPOCHS=${EPOCHS:-70} SIZE=${SIZE:-112} CAP_S=${CAP_S:-480} EXTRA=${EXTRA:-} PY=${PY:-python3}
OUT=${OUT:-runs/gpu_recipes}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c 'import jax, flax, optax, orbax.checkpoint as o, grain; print("jax", jax.__version__,
"flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, jax.devices())' \
  2>&1 | tee "$OUT/versions.txt" || exit 1

run() {   # name config
  timeout --signal=INT "$CAP_S" $PY main.py --config="configs/$2.py" \
    --config.data_dir="$DATA" --config.image_size="$SIZE" --config.num_epochs="$EPOCHS" \
    --config.patience=100 --config.early_stopping_metric=val_accuracy $EXTRA \
    --workdir="$OUT/$1" > "$OUT/$1.log" 2>&1
  echo "$1 exit $?" >> "$OUT/exit_codes.txt"
}
run seed112 cars_lowres &
run fast112 fast30 &
wait
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$OUT/versions.txt" 2>/dev/null
grep -h '^Epoch' "$OUT"/seed112.log | tail -3; grep -h '^Epoch' "$OUT"/fast112.log | tail -3
