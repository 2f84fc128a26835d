#!/bin/bash
# The comparison of docs/segmentation.md on the built-in photos, one heavy process at a time:
# the preset's DINO run, the same ViT trained with labels for the same time (all labels, and 10
# per class), the Jaccard scores and pictures on the 10 000 test scenes, and the diagnosis.
# Usage: bash benchmarks/photo_comparison.sh [RUNS_DIR]   (about 55 min on 2 cores)
set -e
cd "$(dirname "$0")/.."
runs=${1:-/work/runs}
dino_run=$runs/photos-dino
sup=$runs/photos-supervised
[ -f "$dino_run/results.json" ] || dino train --config fashion-mnist-photos --output-dir "$dino_run"
[ -f "$sup/result.json" ] || python benchmarks/supervised_scenes.py --like "$dino_run" --output "$sup"
cd benchmarks
python segmentation.py --data fashion-mnist-photos --dino "$dino_run" --supervised "$sup" \
  --pictures ../docs/images
python photo_diagnosis.py --run dino="$dino_run" --run supervised="$sup/backbone.pth" \
  --random-like "$dino_run" --bank 20000 --queries 5000
python label_efficiency.py --run "$dino_run" --labels 10 --label-seeds 0 --supervised-seeds 0
