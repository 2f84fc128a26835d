#!/usr/bin/env bash
# The first-GPU check: on a machine with one CUDA GPU, in under 8 minutes,
#   1. the tests marked `cuda` (device selection, bf16/fp16 training with the GradScaler, the
#      batched augmentation on the GPU, DDP over NCCL, the memory flags --accumulate and
#      --checkpoint-activations where this version has them),
#   2. the ViT-S/16 training step, ours against the paper-faithful plain step, both bf16
#      (benchmarks/train_step.py),
#   3. the folder pipeline feeding that step: how many DataLoader workers it needs
#      (benchmarks/gpu_pipeline.py),
#   4. a 2-minute `dino train --data DIR` smoke run on a folder of photos made here,
# and writes benchmarks/results/gpu-<device>.json with each part's outcome and numbers.
#
#   benchmarks/gpu_check.sh            # python from PATH; PYTHON=/path/to/python to choose
#
# Without a CUDA GPU it says so and exits with status 3, having run nothing.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU (torch.cuda.is_available() is False here); nothing was run" >&2
    exit 3
fi

DEVICE=$(cd benchmarks && "$PY" -c "import torch; from harness import machine_name; print(machine_name(torch.device('cuda')))")
OUT="benchmarks/results/${DEVICE}.json"
WORK=$(mktemp -d /tmp/dino-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
echo "gpu_check: $DEVICE -> $OUT (work folder $WORK)"
START=$(date +%s)

# 1. the CUDA tests (2.5 min at most)
timeout 150 "$PY" -m pytest tests/test_cuda.py -m cuda -q -p no:cacheprovider \
    --junitxml="$WORK/cuda-tests.xml" 2>&1 | tail -15
echo "${PIPESTATUS[0]}" > "$WORK/cuda-tests.rc"

# 2. the ViT-S/16 step, ours vs the plain step, bf16 (80 s at most)
timeout 80 "$PY" benchmarks/train_step.py --arch vit_small --patch-size 16 --batch-size 64 \
    --global-size 224 --local-size 96 --local-crops 8 --out-dim 65536 --precision bf16 \
    --steps 5 --json "$WORK/step.json" --no-save 2>&1 | tail -8
echo "${PIPESTATUS[0]}" > "$WORK/step.rc"

# 3. workers the folder pipeline needs to feed that step (80 s at most)
timeout 80 "$PY" benchmarks/gpu_pipeline.py --workers 2,4,8,12 --steps 5 \
    --json "$WORK/pipeline.json" 2>&1 | tail -8
echo "${PIPESTATUS[0]}" > "$WORK/pipeline.rc"

# 4. a 2-minute training run on a made folder; stopped by SIGTERM, it saves and exits 143
"$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from input_pipeline import make_photos
make_photos(Path('$WORK/photos'), 512)
"
MEMORY_FLAGS=()
HELP=$("$PY" -m dino train --help)
if grep -q -- "--accumulate" <<<"$HELP"; then MEMORY_FLAGS+=(--accumulate 2); fi
if grep -q -- "--checkpoint-activations BOOL" <<<"$HELP"; then
    MEMORY_FLAGS+=(--checkpoint-activations true)
elif grep -q -- "--checkpoint-activations" <<<"$HELP"; then
    MEMORY_FLAGS+=(--checkpoint-activations)
fi
timeout --preserve-status -s TERM 120 "$PY" -m dino train --data "$WORK/photos" --device cuda --arch vit_small \
    --patch-size 16 --batch-size 64 --epochs 100 --num-workers 8 --eval-every 0 \
    --tensorboard false --output-dir "$WORK/run" "${MEMORY_FLAGS[@]}" 2>&1 | tail -5
echo "${PIPESTATUS[0]}" > "$WORK/smoke.rc"
echo "${MEMORY_FLAGS[*]}" > "$WORK/smoke.flags"

"$PY" - "$WORK" "$OUT" "$START" <<'EOF'
import json, math, sys, time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import torch

work, out, start = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
rc = lambda name: int((work / f"{name}.rc").read_text().strip() or -1)
read = lambda name: json.loads((work / name).read_text()) if (work / name).exists() else None
result = {
    "device": torch.cuda.get_device_name(0),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
}
tests = {"exit_code": rc("cuda-tests")}
if (work / "cuda-tests.xml").exists():
    suite = ET.parse(work / "cuda-tests.xml").getroot().find("testsuite")
    if suite is not None:
        tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        tests["failed"] = [
            c.get("name") for c in suite.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None
        ]
result["cuda_tests"] = tests
result["vit_s16_step_bf16"] = {"exit_code": rc("step"), "result": read("step.json")}
result["folder_pipeline"] = {"exit_code": rc("pipeline"), "result": read("pipeline.json")}
metrics = work / "run" / "metrics.jsonl"
rows = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
losses = [r["loss"] for r in rows if "loss" in r]
smoke_rc = rc("smoke")
result["train_smoke_2min"] = {
    "exit_code": smoke_rc,
    "memory_flags": (work / "smoke.flags").read_text().strip(),
    "logged_steps": len(losses),
    "last_iteration": max((r.get("iteration", 0) for r in rows), default=0),
    "losses_finite": all(math.isfinite(v) for v in losses),
    "first_loss": losses[0] if losses else None,
    "last_loss": losses[-1] if losses else None,
    "ok": smoke_rc in (0, 143) and bool(losses) and all(math.isfinite(v) for v in losses),
}
result["ok"] = (
    tests["exit_code"] == 0
    and rc("step") == 0
    and rc("pipeline") == 0
    and result["train_smoke_2min"]["ok"]
)
result["seconds"] = round(time.time() - start, 1)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k in ("ok", "seconds", "cuda_tests")}, indent=1))
print(f"gpu_check: results -> {out}")
sys.exit(0 if result["ok"] else 1)
EOF
