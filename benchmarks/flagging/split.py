"""Split PBC into the flagging benchmark's sets: 90 % to train on, 5 % to calibrate, 5 % to test.

.venv/bin/python -m benchmarks.flagging.split   # -> benchmarks/scratch/flagging/pbc_{train90,calib5,test5}.npz
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
OUT = ROOT / "benchmarks" / "scratch" / "flagging"


def main() -> None:
    data = np.load(SOURCE)
    n = len(data["images"])
    order = np.random.default_rng(0).permutation(n)
    held, train = np.sort(order[: n // 10]), np.sort(order[n // 10 :])
    halves = np.random.default_rng(1).permutation(len(held))
    calib, test = np.sort(held[halves[: len(held) // 2]]), np.sort(held[halves[len(held) // 2 :]])
    OUT.mkdir(parents=True, exist_ok=True)
    for name, index in (("pbc_train90", train), ("pbc_calib5", calib), ("pbc_test5", test)):
        np.savez(
            OUT / f"{name}.npz",
            images=data["images"][index],
            labels=data["labels"][index],
            class_names=data["class_names"],
            filenames=data["filenames"][index],
        )
        print(f"{OUT / name}.npz: {len(index)} images")


if __name__ == "__main__":
    main()
