"""tsimcne-map from Python: train a t-SimCNE map of an image collection, place new images on it, export it.

    from tsimcne_map import TSimCNE, Bundle
    model = TSimCNE("tiny", epochs=(3, 2, 2))          # a recipe, and any training setting overridden
    coords = model.fit_transform(images, labels)        # (N, 2) float32
    model.transform(new_images)                         # (M, 2): placed on the same map
    bundle = model.export("models/cells")               # a verified, torch-free bundle
    bundle.place(["new/cell.png"]).to_frame()           # position, flag, neighbours: what POST /embed answers
    prepare_store("archive/", "stores/archive", image_size=28)  # `tsimcne prepare`: a collection on disk

`TSimCNE` needs the training extras (torch); `Bundle` only numpy and onnxruntime, so it is imported
without torch (`pip install ".[serve]"`). The CLI (`tsimcne`) and the HTTP service are thin shells over
these objects. Errors: UserError (with DataError, a dataset that cannot be read) and TrainingStopped
from training; BundleError for a bundle that cannot be used; ImageDecodeError for an unreadable image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tsimcne_core.bundle_format import BundleError
from tsimcne_core.errors import DataError, TrainingStopped, UserError
from tsimcne_core.images import ImageDecodeError
from tsimcne_map.bundle import Bundle, PlacedImage, Placements, ReferenceMap, SkippedImage

if TYPE_CHECKING:
    from training.image_store import prepare_store
    from tsimcne_map.estimator import TSimCNE

__all__ = [
    "Bundle",
    "BundleError",
    "DataError",
    "ImageDecodeError",
    "PlacedImage",
    "Placements",
    "ReferenceMap",
    "SkippedImage",
    "TSimCNE",
    "TrainingStopped",
    "UserError",
    "prepare_store",
]


def __getattr__(name: str):
    """TSimCNE is imported on first use: it needs torch, which a serving-only install does not have."""
    if name == "TSimCNE":
        from tsimcne_map.estimator import TSimCNE

        return TSimCNE
    if name == "prepare_store":  # torch-free, but only the training install has its readers' extras
        from training.image_store import prepare_store

        return prepare_store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
