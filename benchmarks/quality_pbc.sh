#!/usr/bin/env bash
# Quality of the CPU recipe on all 17,092 PBC images (28 px): train, evaluate, plot, with wall-clock times.
# Usage: benchmarks/quality_pbc.sh [extra tsimcne train options]   (about 27 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
mkdir -p benchmarks/scratch
runs=benchmarks/scratch/runs
start=$(date +%s)
.venv/bin/tsimcne train --data ../shared/data/bloodcells/pbc_28.npz --name pbc-cpu --recipe cpu \
  --runs-dir "$runs" --overwrite "$@"
trained=$(date +%s)
.venv/bin/tsimcne evaluate "$runs/pbc-cpu"
.venv/bin/tsimcne plot "$runs/pbc-cpu"
end=$(date +%s)
echo "wall clock: training $((trained - start)) s, total $((end - start)) s"
