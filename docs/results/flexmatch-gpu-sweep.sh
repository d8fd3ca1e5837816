#!/usr/bin/env bash
# FlexMatch recipe variants on Fashion-MNIST (100 labels), many runs in parallel on one GPU:
# each run is one process with one CPU thread; batches, augmentation and model live on the GPU
# (the same seeded draws as on the CPU). Rows and results: docs/results/flexmatch.md and
# flexmatch-gpu-sweep.json. FMNIST_ROOT: the IDX folder (default: Debian's package).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=${OUT_DIR:-runs/flexmatch_gpu_sweep}; mkdir -p "$R"
C="--root ${FMNIST_ROOT:-/usr/share/datasets/fashion-mnist} --steps 15000 --eval-every 500"
C="$C --no-progress --device cuda --threads 1"
go() { n=$1; shift; python3 -m training.experiments.fmnist_fixmatch --out "$R/$n" $C "$@" \
         > "$R/$n.log" 2>&1; echo "$n: $(tail -1 "$R/$n.log")"; }
go base_s0 --flex --seed 0 &
go base_s1 --flex --seed 1 &
go emat_s0 --flex --ema-teacher --seed 0 &
go emat_s1 --flex --ema-teacher --seed 1 &
go vgg_s0 --flex --arch small_vgg --width 16 --seed 0 &
go vgg_s1 --flex --arch small_vgg --width 16 --seed 1 &
go ops_s0 --flex --seed 0 \
   --ops identity,autocontrast,rotate,shear_x,shear_y,translate_x,translate_y,contrast,brightness,sharpness &
go lu2_s0 --flex --seed 0 --lambda-u 2 &
go cut3_s0 --flex --seed 0 --cutout 0.3 &
go wd1_s0 --flex --seed 0 --weight-decay 1e-3 &
go fixemat_s0 --seed 0 --ema-teacher &
go drop_s0 --flex --seed 0 --dropout 0.3 &
wait
