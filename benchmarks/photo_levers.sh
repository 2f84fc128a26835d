#!/bin/bash
# The lever runs of docs/segmentation.md on the built-in photos, one after another (one heavy
# process at a time), each scored on 2000 test scenes; then the table (photo_levers.py).
# Usage: bash benchmarks/photo_levers.sh [RUNS_DIR]   (default /work/runs; about 80 min on 2 cores)
set -e
cd "$(dirname "$0")/.."
runs=${1:-/work/runs}
# the preset as it stood before the levers: EMA centering (the preset now uses Sinkhorn)
common=(--config fashion-mnist-photos --subset 20000 --batch-size 64 --warmup-epochs 0.5
        --centering ema)
colour=(--hue 0.5 --saturation 0.4 --grayscale-p 0.5)
lever() {  # NAME EPOCHS FLAGS...: train, then score 2000 test scenes
  local name=$1 epochs=$2; shift 2
  local out=$runs/ph-$name
  [ -f "$out/results.json" ] || dino train "${common[@]}" --epochs "$epochs" --output-dir "$out" "$@"
  dino segment --weights "$out" --data fashion-mnist-photos --score --subset 2000 \
    --json "$out/segment2000.json"
}
lever plain 5
dino segment --weights random --like "$runs/ph-plain" --data fashion-mnist-photos --score \
  --subset 2000 --json "$runs/ph-untrained-segment2000.json"   # the same ViT untrained
lever sinkhorn 5 --centering sinkhorn
lever colour 5 "${colour[@]}"              # stopped by hand after its collapse (step 350)
lever colour-sk 5 "${colour[@]}" --centering sinkhorn   # stopped by hand at step 691, level
lever registers-sk 5 --registers 4 --centering sinkhorn
# the collapse under the strong colour jitter, 1 epoch (312 steps): a lower learning rate from
# `colour`; a smaller K and a lower teacher temperature from `colour-sk`
lever c-lr 1 "${colour[@]}" --lr 0.001
lever c-k256 1 "${colour[@]}" --centering sinkhorn --out-dim 256
lever c-t02 1 "${colour[@]}" --centering sinkhorn --teacher-temp 0.02 --warmup-teacher-temp 0.02
python benchmarks/photo_levers.py --untrained "$runs/ph-untrained-segment2000.json" "$runs"/ph-{plain,sinkhorn,colour,colour-sk,registers-sk,c-lr,c-k256,c-t02}
