"""The three ways of drawing a map that the poster compares, each scored once and cached.

- pixel-space t-SNE: t-SNE of the raw pixels (scaled to [0, 1]);
- SimCLR + t-SNE: a network trained with the cosine (NT-Xent) loss for the stage-1 epochs, its 128-D
  outputs embedded with t-SNE (cosine metric, as the outputs are compared by angle in training);
- t-SimCNE: the three-stage run; the map is the network's own 2-D output.
Every network result also carries a linear probe and kNN on the run's frozen backbone features (Table 3).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.poster.common import Setting, cached, map_scores, network_outputs, save_map, train, tsne
from training.probe import linear_probe


def _training_seconds(run: Path, stages: tuple[int, ...]) -> float:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return round(sum(r["seconds"] for r in records if r["stage"] in stages), 1)


def _probe(out: dict[str, np.ndarray]) -> dict:
    return linear_probe(out["h"], out["labels"], list(out["ids"])).as_dict()


def pixel_tsne(seed: int, setting: Setting) -> dict:
    key = setting.run_name("pixel-tsne", "none", seed, (0, 0, 0))

    def compute() -> dict:
        with np.load(setting.data, allow_pickle=False) as archive:
            images, labels = archive["images"], archive["labels"]
        coords = tsne(images.reshape(len(images), -1).astype(np.float32) / 255, seed)
        save_map(key, coords, labels)
        return {"method": "pixel t-SNE", "seed": seed, "map": key, **map_scores(coords, labels)}

    return cached(key, compute)


def simclr(augmentation: str, seed: int, setting: Setting) -> dict:
    stage1 = (setting.epochs[0], 0, 0)
    key = setting.run_name("simclr", augmentation, seed, stage1)

    def compute() -> dict:
        run = train(key, augmentation, seed, stage1, setting, metric="cosine")
        out = network_outputs(run, "stage1.pt")
        coords = tsne(out["z"], seed, metric="cosine")
        save_map(key, coords, out["labels"])
        return {
            "method": "SimCLR + t-SNE",
            "map": key,
            "augmentation": augmentation,
            "seed": seed,
            "epochs": list(stage1),
            **map_scores(coords, out["labels"]),
            "linear_probe": _probe(out),
            "training_seconds": _training_seconds(run, (1,)),
        }

    return cached(key, compute)


def tsimcne(augmentation: str, seed: int, setting: Setting) -> dict:
    key = setting.run_name("tsimcne", augmentation, seed, setting.epochs)

    def compute() -> dict:
        run = train(key, augmentation, seed, setting.epochs, setting)
        out = network_outputs(run, "stage3.pt")
        save_map(key, out["z"], out["labels"])
        return {
            "method": "t-SimCNE",
            "map": key,
            "augmentation": augmentation,
            "seed": seed,
            "epochs": list(setting.epochs),
            **map_scores(out["z"], out["labels"]),
            "linear_probe": _probe(out),
            "linear_probe_stage1": _probe(network_outputs(run, "stage1.pt")),
            "training_seconds": _training_seconds(run, (1, 2, 3)),
        }

    return cached(key, compute)
