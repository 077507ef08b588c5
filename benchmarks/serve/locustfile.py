"""Locust users for benchmarks/serve/load.py: each posts real PBC image files to /embed, back to back.

Settings from the environment: LOAD_IMAGES_DIR (PNG files), LOAD_IMAGES_PER_REQUEST (default 1),
LOAD_TOKEN (bearer token, optional). A response counts as a failure unless it is 200 and places every
image sent.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import HttpUser, constant, task

FILES = [(path.name, path.read_bytes()) for path in sorted(Path(os.environ["LOAD_IMAGES_DIR"]).glob("*.png"))]
PER_REQUEST = int(os.environ.get("LOAD_IMAGES_PER_REQUEST", "1"))
HEADERS = {"Authorization": f"Bearer {os.environ['LOAD_TOKEN']}"} if os.environ.get("LOAD_TOKEN") else {}


class LabClient(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.files = itertools.cycle(FILES[hash(self) % len(FILES) :] + FILES[: hash(self) % len(FILES)])

    @task
    def embed(self) -> None:
        batch = [next(self.files) for _ in range(PER_REQUEST)]
        files = [("images", (name, data, "image/png")) for name, data in batch]
        with self.client.post("/embed", files=files, headers=HEADERS, catch_response=True, name="/embed") as reply:
            if reply.status_code != 200:
                reply.failure(f"HTTP {reply.status_code}: {reply.text[:200]}")
            elif len(reply.json()["images"]) != len(batch):
                reply.failure("not every image was placed")
