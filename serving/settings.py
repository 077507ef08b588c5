"""Service settings: one validated object, from `bentoml serve --arg key=value` or TSIMCNE_* variables.

`--arg` wins over the environment (a Docker image sets the environment; a person at a terminal types
arguments). Every limit a client can run into is here, with a default that suits cell images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tsimcne_core.cores import usable_cores

ENV_PREFIX = "TSIMCNE_"


class SettingsError(ValueError):
    """A setting with a bad value; the message names the setting, its source and the rule."""


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str | None = Field(None, description="bundle folder made by `tsimcne export`")
    model_tag: str | None = Field(None, description="bundle registered in BentoML's model store, e.g. 'demo:latest'")
    provider: Literal["auto", "cpu", "cuda"] = Field("auto", description="onnxruntime device; cuda refuses CPU")
    neighbours: int = Field(5, ge=1, le=100, description="nearest reference images reported per image")
    max_images: int = Field(64, ge=1, le=4096, description="images per request")
    max_upload_mb: float = Field(32.0, gt=0, le=4096, description="request body size limit in MiB")
    max_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard: pixels per image")
    max_request_pixels: int = Field(
        320_000_000, ge=1, description="pixels of all images of one request together (decoded-size guard)"
    )
    decode_concurrency: int = Field(
        2, ge=1, le=256, description="images of max_pixels decoded at once per worker (smaller ones share the budget)"
    )
    request_budget_s: float = Field(
        60.0, gt=0, le=110, description="seconds a request may wait for and spend in decoding and the model"
    )
    body_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="seconds a request's body may take to arrive (408 after)"
    )
    max_batch_images: int = Field(256, ge=1, le=4096, description="images per model run across requests")
    workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="service processes, each with the bundle open; default: one per usable CPU core (one on a GPU)",
    )
    threads: int = Field(
        0, ge=0, le=256, description="onnxruntime intra-op threads per worker; 0 = the usable cores divided by workers"
    )
    spin: bool = Field(False, description="let onnxruntime's idle threads spin (faster on cores of their own)")
    api_token: str | None = Field(None, description="when set, requests need 'Authorization: Bearer <token>'")
    keepalive_requests: int = Field(
        100,
        ge=0,
        le=1_000_000,
        description="/embed answers on one kept-alive connection, on average, before it asks the client to "
        "reconnect (so that a few long-lived connections spread over all workers); 0: never",
    )
    access_log: bool = Field(False, description="log every request (BentoML's access log and one line per /embed)")
    tracing_sample_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="OpenTelemetry: share of requests traced (BentoML's tracing config says where spans go); "
        "unset: /embed and the map routes are not traced",
    )

    journal: str | None = Field(
        None,
        description="keep every placed image: sqlite:///PATH (one host) or postgresql://USER:PASSWORD@HOST/DB "
        "(several replicas); unset: placed images are not kept",
    )

    journal_sync: Literal["normal", "full"] = Field(
        "normal",
        description="the journal's spool (SQLite, or PostgreSQL with journal_spool): normal keeps what was "
        "answered if the service is killed; full also through a power cut (an fsync per batch, slower)",
    )
    journal_spool: str | None = Field(
        None,
        description="PostgreSQL journal: a folder on this replica's own persistent volume that /embed's rows "
        "are appended to before the answer, moved into PostgreSQL within a second (a fraction of a "
        "transaction's cost; other replicas' reads see them a second later); unset: each batch is committed "
        "to PostgreSQL before its answer. SQLite's spool is always beside its database",
    )

    journal_originals: bool = Field(
        False,
        description="also keep each uploaded file as it came (GET /placements/{id}/original); off: the image at "
        "model size only",
    )
    journal_original_max_mb: float = Field(
        16.0, gt=0, le=4096, description="largest uploaded file the journal keeps (413 above it when originals are on)"
    )
    journal_retention_days: float | None = Field(
        None, gt=0, description="delete placements older than this many days (checked hourly); unset: keep all"
    )
    drift_refresh_s: float = Field(
        60.0, ge=1, le=3600, description="seconds between updates of the drift gauges from the journal"
    )

    @field_validator("journal")
    @classmethod
    def _journal_url(cls, value: str | None) -> str | None:
        if value is None or value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            return value
        raise ValueError("give sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")

    @field_validator("journal_spool")
    @classmethod
    def _spool_for_postgres(cls, value: str | None, info: ValidationInfo) -> str | None:
        journal = info.data.get("journal") or ""  # validated before this field
        if value is not None and not journal.startswith(("postgresql://", "postgres://")):
            raise ValueError("a spool folder is for a PostgreSQL journal (SQLite's spool is beside its database)")
        return value

    @field_validator("api_token")
    @classmethod
    def _token_not_blank(cls, value: str | None) -> str | None:
        """Surrounding whitespace (a trailing newline from a secret file or `echo`) is not part of the
        token: a client sending the token could never match it."""
        if value is None:
            return None
        value = value.strip()
        if len(value) < 16:
            raise ValueError("must be at least 16 characters (use e.g. `openssl rand -hex 32`)")
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def load_settings(
    arguments: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> ServiceSettings:
    """Merge TSIMCNE_<NAME> environment variables and `--arg name=value` arguments (which win)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in ServiceSettings.model_fields:
        variable = ENV_PREFIX + name.upper()
        if environ.get(variable, "") != "":
            values[name], sources[name] = environ[variable], f"environment variable {variable}"
    for name, value in (arguments or {}).items():
        key = name.replace("-", "_")
        values[key], sources[key] = value, f"--arg {name}"
    try:
        return ServiceSettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        source = sources.get(field, field)
        if first["type"] == "extra_forbidden":
            known = ", ".join(ServiceSettings.model_fields)
            raise SettingsError(f"{source}: unknown setting; known settings: {known}") from exc
        raise SettingsError(f"{source}: {first['msg']}") from exc


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    threads: int  # onnxruntime (and FAISS) threads in each worker
    reason: str

    def describe(self) -> str:
        return f"{self.workers} worker(s) x {self.threads} onnxruntime thread(s) ({self.reason})"


def worker_plan(settings: ServiceSettings, cores: int | None = None, gpu: bool | None = None) -> WorkerPlan:
    """How many service processes, and onnxruntime threads in each, for these settings on this machine.

    On CPUs: one worker per usable core, each with one thread (the cores divided between the workers).
    Measured on 2 cores (benchmarks/README.md, "/embed against its floors"): a request's HTTP and Python work
    is single-threaded per process, so two one-thread workers answer far more requests than one worker whose
    model runs on two threads. On a GPU: one worker, which batches every request for the device.
    Explicit `workers` and `threads` settings win."""
    cores = usable_cores() if cores is None else cores
    gpu = _model_on_gpu(settings.provider) if gpu is None else gpu
    if settings.workers is not None:
        workers, reason = settings.workers, "workers set"
    elif gpu:
        workers, reason = 1, "one worker for the GPU"
    else:
        workers, reason = cores, f"one per usable CPU core ({cores})"
    threads = settings.threads or max(1, cores // workers)
    if settings.threads:
        reason += ", threads set"
    return WorkerPlan(workers, threads, reason)


def _model_on_gpu(provider: str) -> bool:
    """Whether the model will run on CUDA: demanded, or `auto` with onnxruntime's CUDA build and a device."""
    if provider == "cpu":
        return False
    if provider == "cuda":
        return True
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers() and Path("/dev/nvidiactl").exists()
