#!/usr/bin/env bash
# The held-out runs behind docs/omniglot-model.md ("The all-class classifier"): the shipped
# recipe at 3,000 episodes with and without --aux-weight 0.5, on both held-out splits (split
# seed 2: Sanskrit + Latin out; split seed 0: Greek + Korean out), exported with 27 views and
# scored on 500 20-way within-alphabet 1-shot episodes (split drawers, episode seed 12345) with
# one and five queries per class, and with one query and --transductive.
# Each run uses one torch thread; PARALLEL of them at a time (default 2: about 40-60 minutes
# per pair on the 2-core machine, so the four runs take about two hours).
#
#   bash docs/omniglot-model/aux-heldout.sh [OUT_DIR]      (needs `make setup`)
#   SPLITS="8 4" bash docs/omniglot-model/aux-heldout.sh   the recipe alone on other split seeds
#   (8: Japanese (katakana) + Tagalog held out; 4: Balinese + Early Aramaic + Greek)
#   SPLITS="2" TAG=_bf16_9k EXTRA="--precision bf16 --episodes 9000" bash ...
#   EXTRA: more metatrain options (a later --episodes wins); TAG: appended to the run names
set -eu
OUT=${1:-runs/aux-heldout}
PARALLEL=${PARALLEL:-2}
P=${PROTOSERVE:-protoserve}
mkdir -p "$OUT"
RECIPE="--backbone conv4 --method protonet --distance l2 --size 32 --way 60 --shot 1 --query 5
  --lr 1e-3 --schedule cosine --warmup 100 --degrees 10 --translate 0.08 --scale 0.9 1.1
  --shear 8 --stroke 0.4 --mirror --crop ink --ink-margin 0.15 --checkpoint-every 250 --seed 0
  --threads 1 --episodes 3000 --val-every 0 --split-by superclasses --val-fraction 0.2
  --no-progress"
run() {  # NAME SPLIT_SEED AUX_WEIGHT
  local r="$OUT/$1"
  # shellcheck disable=SC2086
  $P train metatrain --out "$r" $RECIPE --split-seed "$2" --aux-weight "$3" ${EXTRA:-} \
    > "$r.log" 2>&1
  $P train export --checkpoint "$r/checkpoint.pt" --out "$r/v27" --overwrite \
    --shift-average 3 --rotate-average 10 >> "$r.log" 2>&1
  for args in "--query 1" "--query 5" "--query 1 --transductive"; do
    # shellcheck disable=SC2086
    echo "$1 $args: $($P train evaluate --model "$r/v27" --split-by superclasses \
      --val-fraction 0.2 --split-seed "$2" --way 20 --within-alphabet --split-drawers \
      --episodes 500 --seed 12345 $args 2>/dev/null | tail -n 1)"
  done
}
ROWS=("split2_aux0 2 0" "split2_aux0.5 2 0.5" "split0_aux0 0 0" "split0_aux0.5 0 0.5")
if [ -n "${SPLITS:-}" ]; then  # e.g. SPLITS="8 4": only the recipe (--aux-weight 0.5) on these
  ROWS=()
  for s in $SPLITS; do ROWS+=("split${s}_aux0.5${TAG:-} $s 0.5"); done
fi
for row in "${ROWS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 10; done
  # shellcheck disable=SC2086
  run $row &
done
wait
