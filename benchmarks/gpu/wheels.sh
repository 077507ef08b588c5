#!/usr/bin/env bash
# The project's Python dependencies that the lent GPU machine's image lacks (its python3 is 3.12 with torch,
# scikit-learn, matplotlib, typer, tqdm, pillow, tifffile, onnxruntime; no pydantic), as wheels in .whl/
# (ignored by git) to carry with the device tool. Run here, from the repository root:
#   bash benchmarks/gpu/wheels.sh
# and on the device start the command with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for n in 2_28 2_27 2_17 2_24 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "pydantic>=2.6,<3" "pydantic-core" "annotated-types" "typing-inspection"
# pydantic pins the exact pydantic-core it needs: keep only that one
need=$(unzip -p .whl/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
for wheel in .whl/pydantic_core-*.whl; do
    case "$wheel" in *"pydantic_core-$need-"*) ;; *) rm -f "$wheel" ;; esac
done
[ -n "$(ls .whl/pydantic_core-"$need"-* 2>/dev/null)" ] || python3 -m pip download --quiet --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl "pydantic-core==$need"
if [ "${SERVE:-0}" = 1 ]; then
    # SERVE=1: also what `bentoml serve` needs for benchmarks/gpu/serve_hot_path.sh (bentoml and its
    # dependencies, faiss, scipy, orjson, uvloop, httptools), resolved for the device's Python 3.12.
    python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "bentoml>=1.4.30,<1.5" "faiss-cpu>=1.8" "scipy>=1.11" "orjson>=3.9" \
        "uvloop>=0.19" "httptools>=0.6" "prometheus-client>=0.20" "fastapi>=0.110" "httpx>=0.27"
    rm -f .whl/numpy-* .whl/torch-* .whl/nvidia_* .whl/onnxruntime-* .whl/pillow-*  # the device's own
fi
du -sh .whl
ls -la .whl
