"""`tsimcne embed --engine ray`: the same placing as one process, spread over a Ray cluster with Ray Data.

The unit of work is a chunk of `batch_size` listed files, the batch one process would run: so the rows
written are the same as `Bundle.place` writes, `duplicate_of` included (it looks within a batch).
1. `from_items`: the chunks (start index, paths as listed), spread over blocks;
2. decoding (`decode_chunk`): read and decode each file with tsimcne_core/images.py and fit it to the
   bundle's size (tsimcne_core/preprocess.py `fit_image`), as the service does; an unreadable file keeps its
   error text instead of pixels. With GPUs a `map` of CPU tasks anywhere in the cluster, feeding the GPU
   actors; on CPUs the actors decode their own chunks (ray_cluster.py `plan_actors` says why);
3. `map_batches` with a pool of actors, each opening the bundle once (onnxruntime on CPU or a GPU): the
   placement pipeline of the service and `Bundle.place` (tsimcne_core/placing.py `Placer.place`), its records
   merged as `Bundle.place` merges them (tsimcne_map/bundle.py `add_batch`) and written as Arrow tables of
   tsimcne_map/placement_table.py;
4. `write_parquet` into a temporary folder beside the output, renamed onto it when every shard is written.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tsimcne_core.bundle_format import Preprocessing, open_bundle
from tsimcne_core.errors import UserError
from tsimcne_core.images import ImageDecodeError, read_image
from tsimcne_core.preprocess import fit_image
from tsimcne_map.placement_table import placement_table
from tsimcne_map.ray_cluster import connect, import_ray, onnxruntime_has_cuda, plan_actors

IMAGES_PER_ACTOR_CALL = 1024  # chunks are handed to an actor in groups of about this many images
MIN_ROWS_PER_SHARD = 100_000  # Parquet files of at least this many rows (fewer only in the last ones)


@dataclass(frozen=True)
class RaySummary:
    images: int
    unreadable: int
    seconds: float
    shards: int
    cluster: str  # which Ray was used
    plan: str  # how the placing was spread


def decode_chunk(row: dict[str, Any], prep: Preprocessing, base: str) -> dict[str, Any]:
    """Ray task: read, decode and fit one chunk's files (ids are paths as listed, relative ones to the
    driver's working folder `base`, as a worker's own folder may be another). Pixels of the readable
    ones as one uint8 buffer (N, H, W, 3) in order; `errors` per file ("" when readable). Never raises
    for a bad file."""
    fitted, errors = [], []
    for image_id in row["ids"]:
        try:
            fitted.append(fit_image(read_image(os.path.join(base, image_id), name=image_id), prep))
            errors.append("")
        except ImageDecodeError as exc:
            errors.append(str(exc))
        except Exception as exc:  # an unforeseen decoder failure must not end an hours-long job
            errors.append(f"{image_id}: cannot be read ({type(exc).__name__}: {exc})")
    pixels = np.stack(fitted).tobytes() if fitted else b""
    return {"start": row["start"], "ids": row["ids"], "errors": errors, "pixels": pixels}


class PlacingActor:
    """Ray actor: opens (and verifies) the bundle once, then places the decoded chunks it is handed."""

    def __init__(self, bundle: str, provider: str, neighbours: int, threads: int, base: str) -> None:
        from tsimcne_core.placing import Placer

        self.base = base  # the driver's working folder, for paths listed relative to it
        # spin=False: idle onnxruntime threads sleep instead of taking the CPU from the decoding tasks
        self.placer = Placer(bundle, provider=provider, neighbours=neighbours, threads=threads, spin=False)
        self.prep = self.placer.manifest.preprocessing
        self.shape = (self.prep.height, self.prep.width, 3)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        if rows and "pixels" not in rows[0]:  # no decoding step before this one: decode here
            rows = [decode_chunk(row, self.prep, self.base) for row in rows]
        return pa.concat_tables([self.place_chunk(row) for row in rows])

    def place_chunk(self, row: dict[str, Any]) -> Any:
        from tsimcne_map.bundle import Placements, add_batch

        ids, errors = list(row["ids"]), list(row["errors"])
        problems = {position: error for position, error in enumerate(errors) if error}
        placements = Placements()
        try:
            found = []
            if len(problems) < len(ids):
                fitted = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(-1, *self.shape)
                readable = [image_id for position, image_id in enumerate(ids) if position not in problems]
                found = self.placer.place(self.placer.model_input(fitted), readable)
            add_batch(placements, ids, problems, found)
        except Exception as exc:  # one failed chunk becomes error rows; the job goes on
            placements = Placements()
            failed = {
                p: problems.get(p) or f"{i}: placing failed ({type(exc).__name__}: {exc})" for p, i in enumerate(ids)
            }
            add_batch(placements, ids, failed, [])
        return placement_table(placements.rows(), first_index=row["start"])


def embed_on_ray(
    bundle: Path,
    files: list[Path],
    out: Path,
    provider: str = "auto",
    neighbours: int = 5,
    batch_size: int = 64,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
) -> RaySummary:
    """Place `files` on `bundle`'s map with Ray Data and write Parquet shards into the folder `out`
    (replaced as a whole when the job succeeds; left as it was when it fails)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if out.suffix.lower() == ".csv" or (out.exists() and not out.is_dir()):
        raise UserError(f"{out}: the Ray engine writes a folder of Parquet shards; give --out a folder name")
    manifest = open_bundle(bundle)  # fail here, naming the file, rather than in every actor
    ray = import_ray()
    cluster = connect(address)
    plan = plan_actors(
        provider, ray.cluster_resources(), onnxruntime_has_cuda(), actors, cpus_per_actor, gpus_per_actor
    )
    chunks = [
        {"start": start, "ids": [str(p) for p in files[start : start + batch_size]]}
        for start in range(0, len(files), batch_size)
    ]
    started = time.perf_counter()
    dataset = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), 4 * max(1, plan.max_actors) + 8))
    if plan.separate_decoding:
        dataset = dataset.map(
            decode_chunk, fn_kwargs={"prep": manifest.preprocessing, "base": os.getcwd()}, num_cpus=plan.decode_cpus
        )
    dataset = dataset.map_batches(
        PlacingActor,
        fn_constructor_kwargs={
            "bundle": str(Path(bundle).resolve()),
            "provider": plan.provider,
            "neighbours": neighbours,
            "threads": plan.threads,
            "base": os.getcwd(),
        },
        batch_size=max(1, IMAGES_PER_ACTOR_CALL // batch_size),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus or None,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        dataset.write_parquet(
            str(staging.resolve()),
            min_rows_per_file=MIN_ROWS_PER_SHARD,
            ray_remote_args={"num_cpus": plan.write_cpus},
        )
        _replace_folder(staging, out)
    except Exception as exc:  # Ray's errors carry the worker's traceback: one line of it, and where the rest is
        raise UserError(_job_failure(exc)) from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    seconds = time.perf_counter() - started
    return RaySummary(
        len(files), _count_unreadable(out), seconds, len(list(out.glob("*.parquet"))), cluster, plan.describe()
    )


def _job_failure(exc: Exception) -> str:
    """A failed Ray job in one line: the original error (the last line of Ray's message names it, e.g. a
    BundleError of an actor that could not open the bundle on its node) and where Ray's logs are."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = lines[-1] if lines else type(exc).__name__
    return f"the Ray job failed ({type(exc).__name__}): {cause}; the workers' logs are in /tmp/ray/session_latest/logs"


def _replace_folder(new: Path, out: Path) -> None:
    """Put the finished folder `new` at `out`: renames only, so `out` is always either the old or the new."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)


def _count_unreadable(out: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    errors = pq.read_table(out, columns=["error"]).column("error")
    return int(pc.sum(pc.not_equal(errors, "")).as_py() or 0)
