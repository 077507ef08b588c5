"""The service's request and response shapes (pydantic); BentoML and FastAPI put them in the OpenAPI spec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from serving.embedder import Placement

Flag = Literal["in_distribution", "out_of_distribution", "artefact"]


class Neighbour(BaseModel):
    id: str = Field(description="reference image id (its file name or index in the training data)")
    index: int = Field(description="position in GET /map's arrays; its thumbnail is GET /thumbnail?index={index}")
    label: str | None = Field(description="the reference image's label; null for an unlabelled collection")
    distance: float = Field(description="Euclidean distance on the map")


class EmbeddedImage(BaseModel):
    filename: str = Field(description="the uploaded file's name")
    x: float
    y: float
    flag: Flag = Field(description="where the image landed: among the collection, away from it, or among artefacts")
    score: float = Field(
        description="the flag's score, calibrated so that 1 % of clean images exceed 1; above 1 is out of distribution"
    )
    evidence: dict[str, float] = Field(
        description="each measurement over its own calibrated threshold (above 1 = unusual by that measure "
        "alone): 'features' (network features), 'pixels' (colour and exposure statistics), 'position' (map)"
    )
    duplicate_of: str | None = Field(
        None, description="file name of another image of this request that looks the same (a re-acquisition)"
    )
    neighbours: list[Neighbour] = Field(description="nearest reference images, nearest first")
    majority_label: str | None = Field(description="most common label among the neighbours")
    majority_share: float | None = Field(description="share of the neighbours that carry the majority label")

    @classmethod
    def from_placement(cls, filename: str, placement: Placement, duplicate_of: str | None) -> EmbeddedImage:
        """The answer for one placed image; `duplicate_of` names the other image (placement.duplicate_of
        is its position in the same call)."""
        labels = placement.neighbour_labels or [None] * len(placement.neighbour_ids)
        return cls(
            filename=filename,
            x=placement.x,
            y=placement.y,
            flag=placement.flag,  # type: ignore[arg-type]
            score=placement.score,
            evidence=placement.evidence,
            duplicate_of=duplicate_of,
            neighbours=[
                Neighbour(id=i, index=n, label=label, distance=d)
                for i, n, label, d in zip(
                    placement.neighbour_ids,
                    placement.neighbour_indices,
                    labels,
                    placement.neighbour_distances,
                    strict=True,
                )
            ],
            majority_label=placement.majority_label,
            majority_share=placement.majority_share,
        )


class EmbedResponse(BaseModel):
    bundle: str = Field(description="bundle name")
    bundle_sha256: str = Field(description="sha256 of the bundle's bundle.json (which lists every file's sha256)")
    images: list[EmbeddedImage] = Field(description="one entry per uploaded image, in upload order")


class MapResponse(BaseModel):
    bundle: str
    class_names: list[str]
    x: list[float]
    y: list[float]
    labels: list[int] = Field(description="index into class_names per point; -1 where unlabelled")
    ids: list[str]


class Limits(BaseModel):
    max_images: int
    max_upload_bytes: int
    max_pixels: int
    max_request_pixels: int = Field(description="pixels of all images of one request together")
    request_budget_s: float = Field(description="seconds a request may take to be decoded and placed")


class InfoResponse(BaseModel):
    bundle: str
    bundle_sha256: str
    created: str
    classes: list[str]
    artefact_labels: list[str]
    reference_images: int
    image_size: tuple[int, int] = Field(description="(height, width) the model takes")
    provider: str = Field(description="onnxruntime execution provider actually in use")
    neighbours: int
    neighbour_index: dict[str, Any] | None = Field(
        None,
        description="how neighbours are searched: 'map' (kd-tree) and 'features' (kind, source: the bundle's "
        "memory-mapped file or rebuilt, device: cpu or gpu, and why)",
    )
    calibration: dict[str, Any]
    evaluation: dict[str, Any] | None
    partial: bool
    limits: Limits
    auth_required: bool
    versions: dict[str, dict[str, str]] = Field(description="'bundle': versions that made it; 'service': running")


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, naming the file, field or limit")
    detail: list[dict[str, Any]] | None = Field(None, description="one entry per offending file, when several")
