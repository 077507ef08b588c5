"""Runs the reference package (tsimcne 0.3.12) inside its own venv; called by speed_vs_reference.py.

Usage: python reference_runner.py DATA.npz EPOCHS(e.g. 2 or 6,2,4) BATCH OUT.npz
Only the reference's public API is used: TSimCNE(total_epochs, batch_size).fit(dataset), .transform.
"""

import sys
import time

import numpy as np
import torch
from PIL import Image
from tsimcne.tsimcne import TSimCNE


class NpzImages(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), int(self.labels[i])


def main() -> None:
    data, epochs, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    stages = [int(e) for e in epochs.split(",")]
    with np.load(data) as archive:
        dataset = NpzImages(archive["images"], archive["labels"])
    model = TSimCNE(total_epochs=stages if len(stages) > 1 else stages[0], batch_size=batch)
    started = time.perf_counter()
    model.fit(dataset)
    seconds = time.perf_counter() - started
    coords = model.transform(dataset) if len(stages) == 3 else np.zeros((0, 2), np.float32)
    np.savez(out, coords=np.asarray(coords, np.float32), seconds=seconds, n_images=len(dataset), epochs=stages)
    print(f"reference: {seconds:.1f} s for {stages} epochs on {len(dataset)} images", flush=True)


if __name__ == "__main__":
    main()
