#!/usr/bin/env bash
# Every measurement of docs/performance.md, in the order it reports them. Each script prints
# its table and merges its JSON into benchmarks/results/<machine>.json.
# On a 2-core CPU the whole run takes about 50 minutes; run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}

# the recipe's ViT-S/16 step (the stable entry point), fp32 and bf16, ours vs the plain baseline
$py benchmarks/train_step.py --arch vit_small --patch-size 16 --batch-size 16 --global-size 224 \
    --local-size 96 --local-crops 8 --out-dim 65536 --steps 5 --precision fp32,bf16
# the built-in Fashion-MNIST preset, with torch.compile
$py benchmarks/train_step.py --preset fashion-mnist --precision fp32,bf16 --steps 5 --compile
# torch.compile on the ViT-S/16 step: steady state against both baselines, then the compile
# time with an empty inductor cache
$py benchmarks/train_step.py --arch vit_small --batch-size 16 --precision bf16 --compile \
    --steps 3 --no-memory
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) $py benchmarks/train_step.py --arch vit_small \
    --batch-size 16 --precision bf16 --impl ours --compile --steps 3 --no-memory
$py benchmarks/step_parts.py
$py benchmarks/attention.py
# folders of photos and of Fashion-MNIST PNGs: ours (batched), --augment pil, the reference code's
# augmentation, in memory; the ViT-S/16 step's wait for data (made in /tmp)
$py benchmarks/input_pipeline.py --images 64 --rounds 7 --paths folder,pil,reference,memory \
    --step --no-save --json benchmarks/results/input_pipeline_photos.json
$py benchmarks/input_pipeline.py --preset fashion-mnist --images 1024 --batch-size 128 \
    --rounds 5 --paths folder,pil,reference,memory --no-save \
    --json benchmarks/results/input_pipeline_fashion_mnist.json
# 200 000 files (made once in /tmp/dino-large-folder): listing, cache, check-data, first batch/step
$py benchmarks/large_folder.py --workers 2 --no-save --json benchmarks/results/large_folder_200k.json
$py benchmarks/knn_eval.py
