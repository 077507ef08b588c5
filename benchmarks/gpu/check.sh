#!/usr/bin/env bash
# The CUDA paths, end to end, on one GPU machine: train (bf16 autocast, channels_last) with the reference
# network, crash and resume, export, place images with onnxruntime's CUDA provider, and time onnxruntime on
# the GPU against the CPU. Needs a Python with torch (CUDA), onnxruntime-gpu and the project's core
# dependencies; run from the repository root:
#
#   bash benchmarks/gpu/check.sh PBC_NPZ RESULTS_DIR
#
# Results (logs, log.jsonl, ort_speed.json) go to RESULTS_DIR; the figures are in benchmarks/README.md.
set -euo pipefail
DATA=${1:?give the PBC .npz}
RESULTS=${2:?give a results folder}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu PROVIDER=cpu: a smoke run of this script without a GPU
PROVIDER=${PROVIDER:-cuda}
EPOCHS=${EPOCHS:-10,3,5}
WORK=${WORK:-$(mktemp -d)}  # WORK=DIR keeps the run and the bundle there
mkdir -p "$RESULTS" "$WORK"
tsimcne() { "$PY" -m tsimcne_cli "$@"; }

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/gpu.txt"
fi
"$PY" -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available()); print('onnxruntime', o.__version__, o.get_available_providers())" \
    | tee -a "$RESULTS/gpu.txt"

echo "== train: reference network, $EPOCHS epochs, killed (SIGKILL) after 2 epochs of stage 1 and resumed"
started=$(date +%s)
log="$WORK/runs/gpu/log.jsonl"
# Python itself in the background (not the shell function), so that $! is the process the kill stops.
"$PY" -m tsimcne_cli train --data "$DATA" --name gpu --runs-dir "$WORK/runs" --recipe reference \
    --epochs "$EPOCHS" --device "$DEVICE" --checkpoint-every 1 --no-progress >"$RESULTS/train.log" 2>&1 &
trainer=$!
until [ "$(grep -c '"stage": 1' "$log" 2>/dev/null)" -ge 2 ] 2>/dev/null; do
    kill -0 $trainer 2>/dev/null || { cat "$RESULTS/train.log"; echo "training ended early"; exit 1; }
    sleep 0.2
done
kill -KILL $trainer
wait $trainer || true
cat "$RESULTS/train.log"
echo "-- killed; resuming" | tee -a "$RESULTS/train.log"
tsimcne train --resume "$WORK/runs/gpu" --no-progress 2>&1 | tee -a "$RESULTS/train.log"
echo "train + resume: $(( $(date +%s) - started )) s" | tee -a "$RESULTS/train.log"
cp "$WORK/runs/gpu/log.jsonl" "$RESULTS/log.jsonl"

echo "== export and embed with the CUDA provider"
tsimcne export "$WORK/runs/gpu" --out "$WORK/bundle" 2>&1 | tee "$RESULTS/export.log"
"$PY" - "$DATA" "$WORK/new" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out = Path(sys.argv[2])
out.mkdir()
with np.load(sys.argv[1]) as data:
    for i, image in enumerate(data["images"][-32:]):
        Image.fromarray(image).save(out / f"new_{i:02d}.png")
EOF
tsimcne embed "$WORK/bundle" --data "$WORK/new" --provider "$PROVIDER" --out "$RESULTS/embed_cuda.csv" 2>&1 \
    | tee "$RESULTS/embed.log"

echo "== onnxruntime: CPU against CUDA"
if [ "$PROVIDER" = cuda ]; then
    "$PY" -m benchmarks.gpu.ort_speed "$WORK/bundle" --data "$DATA" --n "${ORT_N:-4096}" --out "$RESULTS/ort_speed.json"
fi
