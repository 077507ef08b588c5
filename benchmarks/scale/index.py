"""The feature index at scale (issue 14): build time, size, recall@15 and search latency of the index the
flag would use, for N reference features.

    taskset -c 1 nice -n 5 .venv/bin/python -m benchmarks.scale.index --sizes 200000 1000000

Features (benchmarks/scale/synthetic_features.py): 128-D, 1,000 cluster centres drawn uniformly on the
unit sphere, each point its centre plus isotropic Gaussian noise (sd 0.06 per dimension: a noise vector
of length ~0.68), scaled back to unit length, so that a point lies ~34 degrees (a distance of ~0.58) from
its centre while random centres lie ~1.4 apart: like the flag's projected unit features, whose
neighbours sit in clusters of cell types, with enough spread inside a cluster that its members' order
matters. The 1,000 queries come from the same distribution (fresh points), as new images of the same
collection would.

For each N and each index kind (FAISS flat: exact; FAISS IVF with 8-bit codes and exact re-ranking of
4 x k candidates, nprobe doubled from 8 until recall@15 >= 0.99, as `tsimcne export` does it:
training/index_building.py `plan_feature_index`): the build time (including the nprobe tuning for IVF), the
saved index file's size, recall@15 against exact search on the 1,000 queries, and the median search
latency for 1 and for 8 queries (k = 15) over --repeats searches, with the numpy brute force (the search
before FAISS) beside them. FAISS runs with one OpenMP thread (the benchmark is pinned to one core).
Writes benchmarks/scratch/scale_index.json and prints each row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

from benchmarks.results import record  # noqa: E402
from benchmarks.scale.synthetic_features import clustered_unit_features  # noqa: E402
from training.index_building import plan_feature_index  # noqa: E402
from tsimcne_core.neighbours import build_index  # noqa: E402

K = 15


def median_latency_ms(index, queries: np.ndarray, repeats: int) -> float:
    index.search(queries, K)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        index.search(queries, K)
        times.append(time.perf_counter() - started)
    return round(1000 * float(np.median(times)), 3)


def measure(n: int, kind: str, queries: np.ndarray, args: argparse.Namespace) -> dict:
    reference = clustered_unit_features(n, seed=1)
    started = time.perf_counter()
    exact_limit = n if kind == "flat" else 0
    index, record = plan_feature_index(reference, queries, K, exact_limit=exact_limit, sample=len(queries))
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        index.save(Path(folder) / "index.faiss")
        size_mb = (Path(folder) / "index.faiss").stat().st_size / 1e6
    row = {
        "n": n,
        "index": record.kind,
        "nlist": record.nlist,
        "nprobe": record.nprobe,
        "build_s": round(build_s, 1),  # IVF: k-means, adding, and the nprobe tuning (with its exact search)
        "index_file_mb": round(size_mb, 1),
        "recall_at_15": round(record.recall, 4),
        "latency_ms_1_query": median_latency_ms(index, queries[:1], args.repeats),
        "latency_ms_8_queries": median_latency_ms(index, queries[:8], args.repeats),
    }
    if kind == "flat":  # numpy brute force, the search before FAISS
        exact = build_index(reference, dtype=np.float32)
        row["numpy_exact_latency_ms_1_query"] = median_latency_ms(exact, queries[:1], max(3, args.repeats // 10))
        row["numpy_exact_latency_ms_8_queries"] = median_latency_ms(exact, queries[:8], max(3, args.repeats // 10))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", choices=("flat", "ivf"), default=["flat", "ivf"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--scratch", type=Path, default=ROOT / "benchmarks" / "scratch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scratch" / "scale_index.json")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)
    args.scratch.mkdir(parents=True, exist_ok=True)
    queries = clustered_unit_features(args.queries, seed=2)
    rows = [measure(n, kind, queries, args) for n in args.sizes for kind in args.kinds]
    result = {
        "faiss": faiss.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record(result, args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
