"""`Bundle`: an exported map, opened to place new images on it. Torch-free (numpy + onnxruntime), so it
works in a serving-only install (`pip install ".[serve]"`).

    from tsimcne_map import Bundle
    bundle = Bundle.open("models/demo")
    placed = bundle.place(["new/cell1.png", "new/cell2.tif"])   # what POST /embed answers, as records
    placed[0].flag, placed[0].x, placed[0].neighbours[0].label
    placed.to_frame()                                            # a pandas DataFrame, one row per image

The records are what the service answers (tsimcne_core/placing.py `PlacedImage`, made by the same `Placer`), so
a pipeline and the HTTP service see the same fields; `filename` holds the image's id (its path, or its
index for arrays).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tsimcne_core.bundle_format import BundleManifest
from tsimcne_core.errors import UserError
from tsimcne_core.images import ImageDecodeError
from tsimcne_core.placing import DEFAULT_NEIGHBOURS, PlacedImage, Placer
from tsimcne_map._inputs import ImageItem, collect_images

if TYPE_CHECKING:
    import pandas


@dataclass(frozen=True)
class SkippedImage:
    id: str
    error: str  # why it could not be read, naming the file


class Placements(list[PlacedImage]):
    """The placed images (a list of PlacedImage, in input order) and the ones that could not be read."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[SkippedImage] = []
        self._order: list[tuple[bool, int]] = []  # (placed?, index) per input image

    def _add(self, placed: PlacedImage) -> None:
        self._order.append((True, len(self)))
        self.append(placed)

    def _skip(self, skipped: SkippedImage) -> None:
        self._order.append((False, len(self.skipped)))
        self.skipped.append(skipped)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per input image, in input order, with the columns of `tsimcne embed`'s table: id,
        x, y, flag, score, majority_label, majority_share, neighbour_ids/_labels/_distances/_indices (lists),
        evidence_features/_pixels/_position, duplicate_of ("" when none), error ("" when placed)."""
        return [
            self[index].row() if placed else {"id": self.skipped[index].id, "error": self.skipped[index].error}
            for placed, index in self._order
        ]

    def to_frame(self) -> pandas.DataFrame:
        """`rows()` as a pandas DataFrame (pandas must be installed: `pip install pandas`)."""
        return _data_frame(self.rows())


@dataclass
class ReferenceMap:
    """The training images on the map, as GET /map serves them."""

    coords: np.ndarray  # float32 (N, 2)
    labels: np.ndarray  # int64 (N,): index into class_names, -1 where unlabelled
    class_names: list[str]
    ids: list[str] = field(default_factory=list)

    def to_frame(self) -> pandas.DataFrame:
        """Columns x, y, label (the class name, or None), id."""
        names = np.array([*self.class_names, None], dtype=object)
        return _data_frame(
            {"x": self.coords[:, 0], "y": self.coords[:, 1], "label": names[self.labels], "id": self.ids}
        )


class Bundle:
    """A verified model bundle (`tsimcne export` / `TSimCNE.export`), ready to place images."""

    def __init__(self, placer: Placer) -> None:
        self._placer = placer

    @classmethod
    def open(
        cls, path: str | Path, provider: str = "auto", neighbours: int = DEFAULT_NEIGHBOURS, threads: int = 0
    ) -> Bundle:
        """Open and verify a bundle folder (every file's sha256, the schema version): BundleError naming
        the file otherwise. provider: "auto" (CUDA when onnxruntime can use it), "cpu" or "cuda" (refused
        without a GPU); neighbours: reference images reported per image (default 5); threads:
        onnxruntime's CPU threads (0: its choice)."""
        return cls(Placer(path, provider=provider, neighbours=neighbours, threads=threads))

    @property
    def path(self) -> Path:
        return self._placer.folder

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def manifest(self) -> BundleManifest:
        """bundle.json: preprocessing, classes, provenance, evaluation, parity, the typed flag calibration."""
        return self._placer.manifest

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider actually in use."""
        return self._placer.provider

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, {len(self._placer.reference):,} reference images, {self.provider})"

    def place(
        self,
        images: object,
        ids: Iterable[str] | None = None,
        batch_size: int = 64,
        skip_unreadable: bool = False,
        progress: bool | None = False,
    ) -> Placements:
        """Place images on the map: what POST /embed answers for each, as PlacedImage records.

        images: file paths and/or arrays (any size; uint8 RGB, grayscale or RGBA), an (N, H, W[, C])
        array, a folder (searched recursively), or a data spec (.npz, .csv, synthetic:N). ids: a name per
        image (default: its path, or its index). Images are prepared as the bundle says (centre crop,
        resize) and run `batch_size` at a time; `duplicate_of` looks within a batch. An unreadable file
        raises ImageDecodeError naming it, or with skip_unreadable is listed in `.skipped` and the rest
        are placed. progress: a progress bar over the batches (None: when on a terminal).
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        items = collect_images(images, ids)
        placements = Placements()
        starts = range(0, len(items), batch_size)
        for start in tqdm(starts, desc="placing", unit="batch", disable=None if progress is None else not progress):
            decoded: list[tuple[ImageItem, np.ndarray]] = []
            problems: dict[int, str] = {}  # position in the batch -> why it could not be read
            for position, item in enumerate(items[start : start + batch_size]):
                try:
                    decoded.append((item, item.decode()))
                except ImageDecodeError as exc:
                    if not skip_unreadable:
                        raise
                    problems[position] = f"{exc}"
            ids = [item.id for item in items[start : start + batch_size]]
            found = (
                self._placer.place(self._placer.prepare([image for _, image in decoded]), [i.id for i, _ in decoded])
                if decoded
                else []
            )
            add_batch(placements, ids, problems, found)
        return placements

    def transform(self, images: object, batch_size: int = 64) -> np.ndarray:
        """Map coordinates only, float32 (N, 2), of the same inputs as `place` (unreadable files raise)."""
        items = collect_images(images)
        placer = self._placer
        chunks = [
            placer.coordinates(placer.prepare([item.decode() for item in items[start : start + batch_size]]))
            for start in range(0, len(items), batch_size)
        ]
        return np.concatenate(chunks).astype(np.float32)

    def reference_map(self) -> ReferenceMap:
        """The training images' positions, labels and ids (GET /map)."""
        reference = self._placer.reference
        return ReferenceMap(
            coords=reference.coords.copy(),
            labels=reference.label_indices.copy(),
            class_names=self.class_names,
            ids=[str(i) for i in reference.ids],
        )

    def register(self) -> str:
        """Add the bundle to BentoML's model store (for `bentoml build`); returns its tag (name:version)."""
        from serving.model_store import register_bundle

        try:
            return register_bundle(self.path)
        except Exception as exc:  # the bundle itself is fine; say so and why the store refused it
            raise UserError(f"bundle written to {self.path}, but BentoML's model store refused it: {exc}") from exc


def add_batch(placements: Placements, ids: list[str], problems: dict[int, str], found: list[PlacedImage]) -> None:
    """One batch's results into `placements`, in input order: `ids` of the whole batch, `problems` (position
    -> why unreadable) and `found`, the records of the readable ones in order (`Placer.place`). Shared by
    `Bundle.place` and the Ray engine (tsimcne_map/ray_embed.py)."""
    if len(ids) - len(problems) != len(found):
        raise ValueError(f"{len(ids) - len(problems)} readable images but {len(found)} placements")
    placed = iter(found)
    for position, image_id in enumerate(ids):
        if position in problems:
            placements._skip(SkippedImage(image_id, problems[position]))
        else:
            placements._add(next(placed))


def _data_frame(data: object) -> pandas.DataFrame:
    try:
        import pandas
    except ImportError:
        raise UserError("a DataFrame needs pandas (pip install pandas); `.rows()` gives the same as dicts") from None
    return pandas.DataFrame(data)
