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
ls -la .whl
