"""Opening the feature index a bundle describes: memory-mapped from the bundle's file (FAISS), or rebuilt as
export built it (training/index_building.py), on the GPU where the model runs on one."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tsimcne_core.bundle_format import BundleError
from tsimcne_core.calibration import (
    FeatureIndex,
)
from tsimcne_core.neighbours import (
    FaissIndex,
    NeighbourIndex,
    as_rows,
    build_faiss_index,
    build_index,
    faiss_available,
    faiss_gpus,
)

logger = logging.getLogger("tsimcne")


def feature_index(reference_projected: np.ndarray, record: FeatureIndex | None) -> NeighbourIndex:
    """The index over the reference features that `record` (bundle.json) describes, built as export built it
    (bundles without an index file: exported before it was saved, or served by rebuilding).

    float32; exact numpy search in blocks of queries within a byte budget: the reference (17,000 x 128
    for PBC) is read once per block instead of once per image, which is what makes the flag cheap under
    load. A FAISS index in a bundle opened where faiss-cpu is missing is searched exactly instead (the
    same neighbours, or better than IVF's), with a warning."""
    vectors = as_rows(reference_projected)
    if record is None or record.kind == "exact":
        return build_index(np.asarray(vectors, dtype=np.float32), dtype=np.float32)
    if not faiss_available():
        logger.warning("the bundle's %s feature index needs faiss-cpu (not installed): searching exactly", record.kind)
        return build_index(np.asarray(vectors, dtype=np.float32), dtype=np.float32)
    if record.kind == "faiss-flat":
        return build_faiss_index(np.asarray(vectors, dtype=np.float32), "flat")
    return build_faiss_index(vectors, "ivf", nlist=record.nlist, nprobe=record.nprobe or 1, refine=record.refine or 4)


def load_feature_index(index_file: Path, record: FeatureIndex, reference_size: int, dims: int) -> FaissIndex:
    """The FAISS index export saved in the bundle, memory-mapped, checked against its record in bundle.json
    and the reference features (BundleError naming the file otherwise); nprobe as the record says."""
    try:
        index = FaissIndex.load(index_file, mmap=True)
    except (RuntimeError, ValueError) as exc:
        raise BundleError(f"{index_file}: not a readable FAISS index ({str(exc).splitlines()[0]})") from exc
    expected = {"faiss-flat": "flat", "faiss-ivf": "ivf"}.get(record.kind)
    if index.kind != expected:
        raise BundleError(f"{index_file}: a {index.kind} index, but bundle.json's feature index is {record.kind}")
    if len(index) != reference_size or index.dims != dims:
        raise BundleError(
            f"{index_file}: holds {len(index)} vectors of {index.dims} dimensions; the reference features are "
            f"{reference_size} x {dims}"
        )
    if index.kind == "ivf":
        if record.nlist is not None and index.nlist != record.nlist:
            raise BundleError(f"{index_file}: {index.nlist} IVF cells, bundle.json says {record.nlist}")
        index.nprobe = record.nprobe or 1
    return index


def open_feature_index(
    reference_projected: np.ndarray, record: FeatureIndex | None, index_file: Path | None = None, gpu: bool = False
) -> tuple[NeighbourIndex, dict[str, str]]:
    """The feature index a serving worker searches, and how it got it (logged, and shown in GET /info).

    A flat (exact) index on the CPU: numpy's exact search over the bundle's memory-mapped features (the same
    neighbours as FAISS's flat index, faster on the batches a service runs). An IVF index: the bundle's index
    file when there is one (memory-mapped: the workers share one copy), else rebuilt from bundle.json's
    record (`feature_index`). gpu=True (the model runs on CUDA): a FAISS index is
    moved to the GPU when this faiss has GPU support and sees a device; where that fails it stays on the
    CPU, and the reason is recorded."""
    mapped = isinstance(reference_projected, np.memmap)
    vectors = np.asarray(reference_projected)
    kind = record.kind if record is not None else "exact"
    if kind == "faiss-flat" and not gpu:
        # Exact search either way: numpy's matrix product over the memory-mapped features answers a batch of
        # queries 1.5-3.5x faster than FAISS's flat index on one thread, the neighbours the same.
        index: NeighbourIndex = build_index(vectors, dtype=np.float32)
        source = f"the bundle's features{', memory-mapped' if mapped else ''} (exact numpy search)"
    elif index_file is not None and record is not None and kind != "exact" and faiss_available():
        index = load_feature_index(index_file, record, len(vectors), vectors.shape[1])
        source = "bundle file, memory-mapped" if index.memory_mapped else "bundle file, read into memory"
    else:
        index = feature_index(vectors, record)
        source = "rebuilt from bundle.json" if isinstance(index, FaissIndex) else "exact numpy search"
    info = {"kind": kind, "source": source, "device": "cpu", "device_reason": "the model runs on the CPU"}
    if isinstance(index, FaissIndex) and gpu:
        info["device_reason"] = _move_to_gpu(index)
        info["device"] = index.device
    elif gpu:
        info["device_reason"] = "numpy exact search runs on the CPU"
    logger.info(
        "feature index: %s (%d vectors), %s, on the %s (%s)",
        kind, len(index), source, info["device"].upper(), info["device_reason"],
    )  # fmt: skip
    return index, info


def _move_to_gpu(index: FaissIndex) -> str:
    """Move `index` to the first CUDA device if faiss can; the reason for where it ended up."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return "this faiss has no GPU support (faiss-cpu; the GPU image installs faiss-gpu-cu12)"
    if faiss_gpus() == 0:
        return "faiss sees no CUDA device"
    try:
        index.to_gpu(0)
    except Exception as exc:  # a device the wheel was not built for, out of memory, nprobe above the limit
        logger.warning("the feature index stays on the CPU: moving it to the GPU failed: %s", exc)
        return f"moving it to the GPU failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return "faiss GPU index on CUDA device 0"
