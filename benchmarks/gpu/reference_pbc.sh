#!/usr/bin/env bash
# The paper's full schedule on PBC in one command, on one GPU: the `reference` recipe (ResNet-18 width 64,
# 1000/50/450 epochs, batch 1024, default augmentations unless AUGMENTATION=...), then evaluate (kNN,
# silhouette, linear probe), plot, and a summary with images/s, model TFLOP/s, MFU and the paper's targets.
#
#   bash benchmarks/gpu/reference_pbc.sh PBC_NPZ RESULTS_DIR
#
# Target (issue 11): the whole schedule in under 10 minutes on one H200; kNN >= 0.93, silhouette >= 0.50.
# A 15-minute device lease holds start-up + this script; if the training process dies (a torch.compile
# failure on a new stack, say) the run is resumed once without compile, so the lease is not lost.
#
# Environment: PYTHON (default python3; needs torch with CUDA and the project's core dependencies:
#   benchmarks/gpu/wheels.sh fetches the ones the lent machine lacks), DEVICE (cuda; cpu for the smoke
#   test), EPOCHS (default 1000,50,450), WIDTH, BATCH, AUGMENTATION (default: the recipe's), WORK (where the
#   run goes; default a temporary folder), COMPILE (auto|on|off), GUARD (seconds after which training is
#   stopped cleanly; the summary then projects the full schedule from the epochs that ran).
# Outputs in RESULTS_DIR: train.log, log.jsonl, metrics.json, map.png, summary.json, summary.md.
set -euo pipefail
DATA=${1:?give the PBC .npz (pbc_28.npz)}
RESULTS=${2:?give a results folder}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$RESULTS" "$WORK"
RESULTS=$(cd "$RESULTS" && pwd)
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1

"$PY" - <<'PYEOF' || { echo "error: missing Python packages (see above); benchmarks/gpu/wheels.sh" >&2; exit 2; }
import importlib.util, sys
missing = [m for m in ("torch", "numpy", "pydantic", "typer", "tqdm", "sklearn", "matplotlib", "PIL", "tifffile")
           if importlib.util.find_spec(m) is None]
if missing:
    print("missing:", ", ".join(missing), file=sys.stderr)
    sys.exit(1)
PYEOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RESULTS/gpu.txt"
fi

options=(--recipe reference --device "$DEVICE" --no-progress --checkpoint-every 50)
[ -n "${EPOCHS:-}" ] && options+=(--epochs "$EPOCHS")
[ -n "${WIDTH:-}" ] && options+=(--width "$WIDTH")
[ -n "${BATCH:-}" ] && options+=(--batch-size "$BATCH")
[ -n "${AUGMENTATION:-}" ] && options+=(--augmentation "$AUGMENTATION")
[ -n "${COMPILE:-}" ] && options+=(--compile "$COMPILE")
run="$WORK/runs/reference"
started=$(date +%s)
guard=()  # GUARD=SECONDS: stop training cleanly (SIGINT: checkpoint, exit) after that long
[ -n "${GUARD:-}" ] && guard=(timeout --signal=INT --kill-after=60 "$GUARD")
set +e
"${guard[@]}" "$PY" -m tsimcne_cli train --data "$DATA" --name reference --runs-dir "$WORK/runs" "${options[@]}" \
    2>&1 | tee "$RESULTS/train.log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ] && [ "$status" -ne 130 ] && [ "$status" -ne 124 ] && [ -f "$run/last.pt" ]; then
    echo "== training failed ($status); resuming once with --compile off" | tee -a "$RESULTS/train.log"
    "$PY" -m tsimcne_cli train --resume "$run" --compile off --no-progress 2>&1 | tee -a "$RESULTS/train.log"
    status=${PIPESTATUS[0]}
fi
set -e
trained=$(date +%s)
if [ "$status" -ne 0 ]; then  # stopped (Ctrl-C / the lease's time guard) or failed: summarise what ran
    echo "== training did not finish (exit $status); summary of the epochs that ran" | tee -a "$RESULTS/train.log"
    cp "$run/log.jsonl" "$run/config.json" "$RESULTS/" 2>/dev/null || true
    "$PY" -m benchmarks.gpu.summarize "$RESULTS" --train-seconds "$((trained - started))" \
        --gpu "$(cat "$RESULTS/gpu.txt" 2>/dev/null || echo cpu)"
    exit "$status"
fi
"$PY" -m tsimcne_cli evaluate "$run" --linear --device "$DEVICE" 2>&1 | tee "$RESULTS/evaluate.log"
"$PY" -m tsimcne_cli plot "$run" --out "$RESULTS/map.png"
cp "$run/log.jsonl" "$run/metrics.json" "$run/config.json" "$RESULTS/"
"$PY" -m benchmarks.gpu.summarize "$RESULTS" --train-seconds "$((trained - started))" \
    --gpu "$(cat "$RESULTS/gpu.txt" 2>/dev/null || echo cpu)"
