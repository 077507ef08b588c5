#!/usr/bin/env bash
# /embed on a lent GPU: the hot-path benchmark (benchmarks/serve/hot_path.py) with provider=cuda, in one call
# of the device tool (well under its 10 minutes a command). Prepared here:
#   bash benchmarks/gpu/wheels.sh                      # .whl/: what the device image lacks (pydantic & co.)
#   mkdir -p .gpudata .gpubin && cp ../shared/data/bloodcells/pbc_28.npz .gpudata/
#   cp /usr/bin/wrk .gpubin/ && cp /usr/lib/x86_64-linux-gnu/libluajit-5.1.so.2 .gpubin/   # the load generator
#   echo /.gpudata/ >> .git/info/exclude; echo /.gpubin/ >> .git/info/exclude
# and run with the device tool (carry: [".whl", ".gpudata", ".gpubin"], timeout_s 600):
#   bash benchmarks/gpu/serve_hot_path.sh .gpudata/pbc_28.npz "$OUT"
# It trains the cpu recipe's network for 1/1/1 epochs on the GPU (serving speed does not depend on the
# weights), exports the 17k bundle, and runs the /embed rows (1 and 8 images a request, multipart and raw)
# with the CUDA provider and, for comparison, the CPU provider, 20 s a row (one worker on the GPU, by the
# service's default plan). Results: $OUT/hot_path-*.json.
set -uo pipefail
DATA=${1:?give the PBC .npz}
OUT=${2:?give the output folder}
SECONDS_PER_ROW=${SECONDS_PER_ROW:-20}
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu PROVIDERS=cpu: a smoke run of this script without a GPU (CI)
PROVIDERS=${PROVIDERS:-cuda cpu}
RECIPE=${RECIPE:-cpu}           # the network served (the smoke run: tiny)
WARM_UP=${WARM_UP:-5}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -x .gpubin/wrk ]; then
    export WRK=$PWD/.gpubin/wrk LD_LIBRARY_PATH=$PWD/.gpubin:${LD_LIBRARY_PATH:-}
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -m tsimcne_cli train --data "$DATA" --name serve --runs-dir "$WORK/runs" --recipe "$RECIPE" --epochs 1,1,1 \
    --device "$DEVICE" --no-progress > "$OUT/train.log" 2>&1 || { tail "$OUT/train.log"; exit 1; }
"$PY" -m tsimcne_cli export "$WORK/runs/serve" --out "$WORK/pbc-17k" > "$OUT/export.log" 2>&1 \
    || { tail "$OUT/export.log"; exit 1; }
status=0
for provider in $PROVIDERS; do
    timeout 240 "$PY" -m benchmarks.serve.hot_path --bundle "$WORK/pbc-17k" --large-bundle none --only "embed (defaults)" \
        --provider "$provider" --seconds "$SECONDS_PER_ROW" --warm-up "$WARM_UP" --out "$OUT/hot_path-$provider.json" \
        > "$OUT/hot_path-$provider.log" 2>&1 || { status=1; tail "$OUT/hot_path-$provider.log"; }
    grep "^|" "$OUT/hot_path-$provider.log"
done
ls "$OUT"
exit $status
