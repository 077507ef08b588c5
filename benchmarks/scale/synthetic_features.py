"""Random-but-clustered unit feature vectors for the scale benchmarks (benchmarks/scale/)."""

from __future__ import annotations

import numpy as np


def clustered_unit_features(
    n: int, seed: int, dims: int = 128, centres: int = 1000, spread: float = 0.06
) -> np.ndarray:
    """n float32 unit vectors: `centres` centres drawn uniformly on the unit sphere (the same for every
    seed), each point its centre plus isotropic Gaussian noise (sd `spread` per dimension: for 128-D a
    noise vector of length ~0.68), scaled back to unit length. A point then lies ~34 degrees (a distance
    of ~0.58) from its centre while random centres lie ~1.4 apart: like the flag's projected unit
    features, whose neighbours sit in clusters of cell types, with enough spread inside a cluster that
    its members' order matters."""
    centre_rng = np.random.default_rng(12345)  # the same centres for the reference and the queries
    middle = centre_rng.normal(size=(centres, dims))
    middle /= np.linalg.norm(middle, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dims), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: float64 temporaries of 10^6 x 128 would take 1 GB
        stop = min(start + 100_000, n)
        block = middle[rng.integers(0, centres, stop - start)] + rng.normal(0, spread, (stop - start, dims))
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out
