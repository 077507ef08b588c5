"""The service's request and response shapes (pydantic); BentoML and FastAPI put them in the OpenAPI spec.

A placed image is tsimcne_core/placing.py's `PlacedImage` record itself (a dataclass pydantic reads the schema
of), so the answer /embed sends and the schema it documents cannot drift apart."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from tsimcne_core.placing import PlacedImage


class EmbedResponse(BaseModel):
    bundle: str = Field(description="bundle name")
    bundle_sha256: str = Field(description="sha256 of the bundle's bundle.json (which lists every file's sha256)")
    images: list[PlacedImage] = Field(description="one entry per uploaded image, in upload order")


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
    folds: list[dict[str, Any]] = Field(
        default_factory=list,
        description="journal images reviewed as fine folded into the reference (tsimcne journal fold), oldest "
        "first: when, from which bundle (name, sha256), how many images, which journal rows, what was left out",
    )
    limits: Limits
    auth_required: bool
    versions: dict[str, dict[str, str]] = Field(description="'bundle': versions that made it; 'service': running")


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, naming the file, field or limit")
    detail: list[dict[str, Any]] | None = Field(None, description="one entry per offending file, when several")
