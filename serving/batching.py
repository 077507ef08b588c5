"""Adaptive batching of model runs across concurrent requests, inside one service worker.

While the model is busy, requests queue; when it is free, the next run takes everything queued (up to
`max_images`), so batches grow with the load and an idle service answers a lone request at once, with
no waiting window. The run itself happens in a thread (onnxruntime releases the GIL), so the event
loop keeps accepting and decoding uploads meanwhile.

Why not BentoML's `batchable=True`: BentoML batches only calls that arrive over HTTP at the batchable
endpoint itself (or through its own JSON proxy); /embed must first validate and decode each request's
uploads and answer a bad one with its own 4xx, which a shared batched call cannot do, and a JSON round
trip of pixel arrays costs more than the model on small images.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Pending:
    inputs: np.ndarray
    done: asyncio.Future = field(repr=False)


class MicroBatcher:
    """`await batcher.run(inputs)` returns `model(inputs)`, computed together with other callers' inputs."""

    def __init__(self, model: Callable[[np.ndarray], np.ndarray], max_images: int = 256) -> None:
        self.model = model
        self.max_images = max_images
        self._waiting: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def run(self, inputs: np.ndarray) -> np.ndarray:
        if len(inputs) == 0:
            raise ValueError("no inputs")
        loop = asyncio.get_running_loop()
        if self._wakeup is None or self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._serve(self._wakeup))
        pending = _Pending(inputs, loop.create_future())
        self._waiting.append(pending)
        self._wakeup.set()
        return await pending.done

    def _next_group(self) -> list[_Pending]:
        """The oldest request and as many following ones as fit in max_images (at least one)."""
        group = [self._waiting.popleft()]
        count = len(group[0].inputs)
        while self._waiting and count + len(self._waiting[0].inputs) <= self.max_images:
            item = self._waiting.popleft()
            group.append(item)
            count += len(item.inputs)
        return group

    async def _serve(self, wakeup: asyncio.Event) -> None:
        while True:
            if not self._waiting:
                wakeup.clear()
                await wakeup.wait()
                continue
            group = self._next_group()
            group = [item for item in group if not item.done.cancelled()]  # a client went away
            if not group:
                continue
            batch = group[0].inputs if len(group) == 1 else np.concatenate([item.inputs for item in group])
            try:
                outputs = await asyncio.to_thread(self.model, batch)
            except Exception as exc:  # every caller of this batch learns of it; the worker goes on
                for item in group:
                    if not item.done.done():
                        item.done.set_exception(exc)
                continue
            start = 0
            for item in group:
                stop = start + len(item.inputs)
                if not item.done.done():
                    item.done.set_result(outputs[start:stop])
                start = stop

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
