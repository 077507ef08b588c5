"""Joining Ray for `tsimcne embed --engine ray`, and sizing the pool of placing actors to the cluster.

Ray is imported here only, and only when the Ray engine is asked for: the service and the base CLI do
not need it. Without an address (no `--ray-address`, no RAY_ADDRESS) a local Ray is started in this
process with as many CPUs as the process may use (its CPU affinity, so `taskset` is respected); with one,
the same job runs unchanged on that cluster.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType

from tsimcne_core.cores import usable_cores
from tsimcne_core.errors import UserError

RAY_EXTRA = "cluster"  # pyproject.toml's extra that installs Ray Data
MISSING_RAY = (
    f"the Ray engine needs Ray Data, which is not installed: pip install '.[{RAY_EXTRA}]' "
    f"(or `pip install tsimcne-map[{RAY_EXTRA}]`), or run without --engine ray"
)


def import_ray() -> ModuleType:
    """ray, with ray.data loaded; UserError naming the extra to install when it is missing."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # Ray without its data extra imports, but cannot run the job
    except ImportError:
        raise UserError(MISSING_RAY) from None
    return ray


def connect(address: str | None) -> str:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray; a line saying which."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():  # already joined by the caller (a notebook, the tests)
        return "the Ray instance this process has already joined"
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise UserError(f"cannot join the Ray cluster at {address}: {exc}") from None
        return f"the Ray cluster at {address}"
    cpus = usable_cores()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return f"a local Ray with {cpus} CPU(s) (started here; --ray-address or RAY_ADDRESS joins a cluster)"


@dataclass(frozen=True)
class ActorPlan:
    """How the job is spread: Ray's resource requests per placing actor, per decoding task (0: the actors
    decode themselves) and per writing task, the actor pool's bounds, and each actor's onnxruntime
    provider and threads."""

    provider: str  # "cpu" or "cuda"
    actor_cpus: float
    actor_gpus: float
    min_actors: int
    max_actors: int
    decode_cpus: float  # 0: decoding happens in the actors
    write_cpus: float
    threads: int  # onnxruntime intra-op threads per actor

    @property
    def separate_decoding(self) -> bool:
        return self.decode_cpus > 0

    def describe(self) -> str:
        pool = f"{self.min_actors}" if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        device = f"{self.actor_gpus:g} GPU" if self.actor_gpus else f"{self.actor_cpus:g} CPU"
        where = "in CPU tasks across the cluster" if self.separate_decoding else "in the actors"
        return f"{pool} onnxruntime actor(s) ({self.provider}, {device} each), decoding {where}"


def plan_actors(
    provider: str,
    cluster: dict[str, float],
    onnxruntime_has_cuda: bool,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
) -> ActorPlan:
    """The plan for a cluster with resources `cluster` (ray.cluster_resources(): "CPU", "GPU").

    provider: "cpu" never asks for GPUs; "cuda" needs them (UserError otherwise); "auto" uses them when
    the cluster has GPUs and onnxruntime here can use CUDA (onnxruntime-gpu installed).
    - GPUs: each actor takes `gpus_per_actor` (default 1), the pool fills the GPUs (at most `actors`),
      and decoding runs in separate CPU tasks anywhere in the cluster, so the GPUs never wait for it.
    - CPUs: each actor reads, decodes and places its chunks itself (no pixels copied between processes:
      on CPUs that copy would cost more than it frees), and the pool grows from one actor to what the
      CPUs hold beside a writing task (at most `actors`). Requests are at most half the cluster's CPUs,
      so on one CPU they are fractional and the writing task runs beside the actor, not after it.
    """
    if provider not in ("auto", "cpu", "cuda"):
        raise UserError(f"provider {provider!r}: choose auto, cpu or cuda")
    if actors is not None and actors < 1:
        raise UserError(f"--actors must be at least 1, got {actors}")
    if cpus_per_actor <= 0:
        raise UserError(f"--cpus-per-actor must be positive, got {cpus_per_actor}")
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if cpus <= 0:
        raise UserError("the Ray cluster has no CPUs to decode images on")
    use_gpus = provider == "cuda" or (provider == "auto" and gpus > 0 and onnxruntime_has_cuda)
    if gpus_per_actor is not None and gpus_per_actor > 0 and provider != "cpu":
        use_gpus = True
    write_cpus = min(1.0, cpus / 2)
    if use_gpus:
        if gpus <= 0:
            raise UserError("--provider cuda (or --gpus-per-actor) asks for GPUs, but the Ray cluster has none")
        per_actor = gpus_per_actor if gpus_per_actor else 1.0
        if per_actor > gpus:
            raise UserError(f"--gpus-per-actor {per_actor:g}: the Ray cluster has {gpus:g} GPU(s)")
        fits = max(1, math.floor(gpus / per_actor + 1e-9))
        count = min(actors, fits) if actors else fits
        actor_cpus = min(1.0, cpus / (2 * count))  # the rest of the CPUs decode
        return ActorPlan("cuda", actor_cpus, per_actor, count, count, min(1.0, cpus / 2), write_cpus, 1)
    actor_cpus = min(cpus_per_actor, cpus / 2)
    fits = max(1, math.floor((cpus - write_cpus) / actor_cpus + 1e-9))
    return ActorPlan("cpu", actor_cpus, 0.0, 1, actors or fits, 0.0, write_cpus, max(1, round(actor_cpus)))


def onnxruntime_has_cuda() -> bool:
    """Whether this machine's onnxruntime can use CUDA (onnxruntime-gpu); the workers are assumed alike."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()
