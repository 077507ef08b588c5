#!/usr/bin/env bash
# One call of a lent GPU (15 minutes in all, start-up included; 10 minutes per command): profile the
# training step, then the paper's full schedule on PBC with a time guard, then the summary. Prepared here:
#   bash benchmarks/gpu/wheels.sh                        # .whl/: pydantic & co. (the device image lacks them)
#   mkdir -p .gpudata && cp ../shared/data/bloodcells/pbc_28.npz .gpudata/ && echo /.gpudata/ >> .git/info/exclude
# and run with the device tool (carry: [".whl", ".gpudata"], timeout_s 600):
#   bash benchmarks/gpu/lease.sh .gpudata/pbc_28.npz "$OUT"
# If the schedule does not finish in GUARD seconds it is stopped cleanly (a checkpoint is written) and the
# summary projects the full schedule's time from the epochs that ran.
set -uo pipefail
DATA=${1:?give the PBC .npz}
OUT=${2:?give the output folder}
GUARD=${GUARD:-510}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
timeout 60 python3 -m benchmarks.gpu.profile_step "$DATA" --device "${DEVICE:-cuda}" --width "${WIDTH:-64}" --batch "${BATCH:-1024}" --steps 10 --skip-compile \
    --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1 || echo "profile: exit $?"
GUARD=$GUARD bash benchmarks/gpu/reference_pbc.sh "$DATA" "$OUT"
echo "reference_pbc.sh: exit $?"
cat "$OUT/summary.md" 2>/dev/null
# The device tool brings back at most 8 files: keep the results, pack the logs into one archive.
(cd "$OUT" && tar czf logs.tar.gz --remove-files ./*.log config.json gpu.txt 2>/dev/null)
ls "$OUT"
