#!/usr/bin/env bash
# The GPU sweep behind docs/omniglot-model.md ("Input size and schedule"): each row of
# ablation.json's gpu_sweep is one `metatrain` on the held-out split (Greek + Korean out),
# exported with 3x3 +-3 px shift averaging and scored on 500 20-way within-alphabet episodes.
# Runs PARALLEL rows at a time (default 8; each row uses 2 CPU threads for its episodes).
#
#   bash docs/omniglot-model/gpu-sweep.sh [OUT_DIR]      (needs a CUDA GPU and `pip install .[train]`)
set -u
OUT=${1:-runs/gpu-sweep}
PARALLEL=${PARALLEL:-8}
P=${PROTOSERVE:-protoserve}
mkdir -p "$OUT"
RECIPE="--backbone conv4 --method protonet --distance l2 --way 60 --shot 1 --query 5 --lr 1e-3
  --schedule cosine --warmup 100 --degrees 10 --translate 0.08 --scale 0.9 1.1 --shear 8
  --stroke 0.4 --checkpoint-every 500 --threads 2 --split-by superclasses --val-fraction 0.2
  --val-every 0 --no-progress --device ${DEVICE:-cuda}"
ROWS=(
  "a40_4k_s0 --size 40 --episodes 4000 --seed 0"
  "a40_4k_s1 --size 40 --episodes 4000 --seed 1"
  "a40_4k_s2 --size 40 --episodes 4000 --seed 2"
  "b40_7k --size 40 --episodes 7000 --seed 0"
  "e40_w100 --size 40 --episodes 4000 --seed 0 --way 100"
  "h40_lr2 --size 40 --episodes 4000 --seed 0 --lr 2e-3"
  "g40_aug --size 40 --episodes 4000 --seed 0 --degrees 15 --translate 0.1 --shear 10 --stroke 0.6"
  "i36_5k --size 36 --episodes 5000 --seed 0"
  "f32_5k_s0 --size 32 --episodes 5000 --seed 0"
  "f32_5k_s1 --size 32 --episodes 5000 --seed 1"
  "f32_5k_s2 --size 32 --episodes 5000 --seed 2"
  "c28_10k --size 28 --episodes 10000 --seed 0"
  "d28_h96 --size 28 --episodes 4000 --seed 0 --hidden 96"
)
row() {
  local name=$1; shift
  # shellcheck disable=SC2086  # RECIPE is a flag list
  $P train metatrain --out "$OUT/$name" --restart $RECIPE "$@" >"$OUT/$name.log" 2>&1 || {
    echo "$name: training failed, see $OUT/$name.log"; return 1; }
  $P train export --checkpoint "$OUT/$name/checkpoint.pt" --out "$OUT/$name/shifted" \
    --overwrite --shift-average 3 >>"$OUT/$name.log" 2>&1
  echo "$name: $($P train evaluate --model "$OUT/$name/shifted" --split-by superclasses \
    --val-fraction 0.2 --way 20 --within-alphabet --split-drawers --query 5 --episodes 500 \
    --threads 2 2>>"$OUT/$name.log" | tail -1)"
}
for r in "${ROWS[@]}"; do
  # shellcheck disable=SC2086
  row $r &
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
done
wait
