"""Wall clock and peak memory of `tsimcne prepare` and `tsimcne export --reference` at N images.

Steps (only 3 and 4 are measured):
1. the collection: N real PNG files (benchmarks/scale/make_collection.py: PBC images tiled through the
   project's augmentations), made unless --collection names one;
2. a network: a small run trained on the first --train-images PBC images at 28 px (labs train on a
   subset, then map the whole archive);
3. `tsimcne prepare COLLECTION --image-size 28 --out STORE`;
4. `tsimcne export RUN --reference STORE --out BUNDLE`;
and, for scale, a process that only imports what export imports (torch alone is ~800 MB resident).
Each measured command runs as its own process; its peak resident memory is the kernel's own count
for that process (os.wait4's ru_maxrss), its time the wall clock around it. Results: printed, and
written to WORK/results-N.json.

    taskset -c 1 nice -n 5 .venv/bin/python -m benchmarks.scale.prepare_export --n 20000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.results import record

ROOT = Path(__file__).resolve().parents[2]
PBC = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
CLI = [sys.executable, "-m", "tsimcne_cli"]


def measured(command: list[str], log: Path) -> dict:
    """Run `command` (output to `log`); its wall seconds and peak RSS (MiB). Stops if it fails."""
    started = time.perf_counter()
    with log.open("w") as output:
        child = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        # wait4 reaps the child and returns its own resource usage (ru_maxrss: KiB on Linux)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n{text[-3000:]}")
    print(text.strip().splitlines()[-1])
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True, help="collection size")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "scratch" / "scale")
    parser.add_argument("--collection", type=Path, help="an existing collection folder (default: make one)")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--width", type=int, default=16, help="network width of the trained run")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    collection = args.collection or work / f"collection-{args.n}"
    if not collection.exists():
        maker = [sys.executable, "-m", "benchmarks.scale.make_collection"]
        subprocess.run([*maker, "--n", str(args.n), "--out", str(collection)], cwd=ROOT, check=True)
    run = work / "runs" / f"subset-{args.train_images}-w{args.width}"
    if not (run / "stage3.pt").is_file():
        with np.load(PBC, allow_pickle=False) as archive:
            subset = {key: archive[key][: args.train_images] for key in ("images", "labels")}
            subset["class_names"] = archive["class_names"]
        np.savez(work / "train-subset.npz", **subset)
        train = [*CLI, "train", "--data", str(work / "train-subset.npz"), "--name", run.name, "--runs-dir",
                 str(run.parent), "--recipe", "tiny", "--width", str(args.width), "--epochs", "1,1,1",
                 "--overwrite", "--no-progress"]  # fmt: skip
        subprocess.run(train, cwd=ROOT, check=True)
    store, bundle = work / f"store-{args.n}", work / f"bundle-{args.n}"
    for old in (store, bundle):
        shutil.rmtree(old, ignore_errors=True)
    # what the export's process holds before touching any data: torch, onnxruntime and the export code
    imports = [sys.executable, "-c", "import torch, onnxruntime, training.export; print('imported')"]
    baseline = measured(imports, work / "baseline.log")
    prepare = measured(
        [*CLI, "prepare", str(collection), "--image-size", "28", "--out", str(store), "--no-progress"],
        work / "prepare.log",
    )
    export = measured([*CLI, "export", str(run), "--out", str(bundle), "--reference", str(store)], work / "export.log")
    decoded = args.n * 28 * 28 * 3
    results = {
        "n_images": args.n,
        "decoded_mib": round(decoded / 2**20, 1),
        "prepare": prepare,
        "export": export,
        "imports_only": baseline,
        "store_mib": round((store / "images.npy").stat().st_size / 2**20, 1),
        "bundle_mib": round(sum(f.stat().st_size for f in bundle.iterdir()) / 2**20, 1),
    }
    record(results, work / f"results-{args.n}.json")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
