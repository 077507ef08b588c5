"""Issue 14's scale benchmark end to end: a collection of N real-looking cells mapped with a network trained
on a subset, against the same network's bundle of its own training images, in one run.

    taskset -c 1 nice -n 5 .venv/bin/python -m benchmarks.scale.million --n 1000000 \\
        --run RUN --source TRAIN.npz --calibration CALIB.npz --held-out TEST.npz

RUN: a finished training run (trained on TRAIN.npz); CALIB / TEST: two disjoint sets of clean images of the
same collection the network never saw (benchmarks/flagging/split.py makes PBC's 90/5/5 split). Steps, each
skipped when its output exists (so an interrupted run continues):
1. the collection: N PNG files tiled from TRAIN.npz through the project's augmentations (make_collection.py);
2. `tsimcne prepare` (wall clock, peak RSS);
3. `tsimcne export RUN --reference STORE --calibration-data CALIB` (wall clock, peak RSS) -> the N bundle,
   and `tsimcne export RUN --calibration-data CALIB` -> the small bundle (the run's own training images);
4. per bundle: the neighbour index and its measured recall@k (bundle.json); the false-flag rate on TEST's
   clean images (tsimcne_map.Bundle.place, the code /embed runs);
5. per bundle: the /embed rows of benchmarks/serve/hot_path.py (wrk, 16 connections, 1 and 8 PBC images per
   request; requests/s, images/s, latency percentiles).
Results: WORK/million-N.json, printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.results import record
from benchmarks.scale.prepare_export import CLI, ROOT, measured


def false_flag_rate(bundle: Path, held_out: Path) -> dict:
    """Share of clean never-seen images the bundle flags (anything but in_distribution)."""
    from tsimcne_map import Bundle

    with np.load(held_out, allow_pickle=False) as archive:
        images = archive["images"]
    placed = Bundle.open(bundle).place(images, batch_size=64)
    flags = [image.flag for image in placed]
    flagged = sum(flag != "in_distribution" for flag in flags)
    return {"images": len(flags), "flagged": flagged, "rate": flagged / len(flags)}


def load_test(bundle: Path, seconds: int, log: Path) -> dict:
    """The /embed rows of benchmarks/serve/hot_path.py (the one load generator) on one bundle; its JSON."""
    result = log.with_suffix(".json")
    command = [sys.executable, "-m", "benchmarks.serve.hot_path", "--bundle", str(bundle), "--large-bundle", "none"]
    command += ["--only", "embed", "--seconds", str(seconds), "--out", str(result)]
    with log.open("w") as output:
        subprocess.run(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, check=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True, help="collection size")
    parser.add_argument("--run", type=Path, required=True, help="a finished training run")
    parser.add_argument("--source", type=Path, required=True, help="the run's training images (.npz) to tile")
    parser.add_argument("--calibration", type=Path, required=True, help="clean never-seen images (.npz)")
    parser.add_argument("--held-out", type=Path, required=True, help="other clean never-seen images (.npz)")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "scratch" / "scale")
    parser.add_argument("--seconds", type=int, default=60, help="seconds of load per images-per-request value")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"million-{args.n}.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"n_images": args.n, "run": str(args.run)})

    def save() -> None:
        record(results, out)

    collection, store = work / f"collection-{args.n}", work / f"store-{args.n}"
    big, small = work / f"bundle-{args.n}", work / f"bundle-{args.run.name}"
    if not (collection / ".complete").is_file():
        shutil.rmtree(collection, ignore_errors=True)
        command = [sys.executable, "-m", "benchmarks.scale.make_collection", "--n", str(args.n)]
        results["collection"] = measured([*command, "--out", str(collection), "--source", str(args.source)],
                                         work / "collection.log")  # fmt: skip
        (collection / ".complete").touch()
        save()
    if not (store / "meta.json").is_file():
        command = [*CLI, "prepare", str(collection), "--image-size", "28", "--out", str(store), "--no-progress"]
        results["prepare"] = measured(command, work / "prepare.log")
        save()
    calibration = ["--calibration-data", str(args.calibration)]
    if not (big / "bundle.json").is_file():
        command = [*CLI, "export", str(args.run), "--out", str(big), "--reference", str(store), *calibration]
        results["export_n"] = measured(command, work / "export-n.log")
        save()
    if not (small / "bundle.json").is_file():
        results["export_small"] = measured([*CLI, "export", str(args.run), "--out", str(small), *calibration],
                                           work / "export-small.log")  # fmt: skip
        save()
    for name, bundle in (("small", small), ("n", big)):
        manifest = json.loads((bundle / "bundle.json").read_text())
        results[f"index_{name}"] = manifest["calibration"]["features"]["index"]
        results[f"false_flags_{name}"] = false_flag_rate(bundle, args.held_out)
        results["target_false_flag_rate"] = manifest["calibration"]["target_false_flag_rate"]
        save()
    if not args.skip_load:
        for name, bundle in (("small", small), ("n", big)):
            results[f"load_{name}"] = load_test(bundle, args.seconds, work / f"load-{name}.log")
            save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
