"""Adaptive batching of model runs across concurrent requests, inside one service worker.

While the model is busy, requests queue; when it is free, the next run takes everything queued (up to
`max_images`), so batches grow with the load and an idle service answers a lone request at once, with
no waiting window. A run happens in the worker's one model thread: `process` gets the queued jobs and
returns one result per job (for /embed: the model run, the placement of the whole batch and each request's
serialised answer, all in that thread), while the event loop keeps reading and decoding other requests
(onnxruntime and numpy release the GIL for the heavy parts).

Why not BentoML's `batchable=True`: BentoML batches only calls that arrive over HTTP at the batchable
endpoint itself (or through its own JSON proxy); /embed must first validate and decode each request's
uploads and answer a bad one with its own 4xx, which a shared batched call cannot do, and a JSON round
trip of pixel arrays costs more than the model on small images.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Job]):
    job: Job
    size: int
    done: asyncio.Future = field(repr=False)


class MicroBatcher(Generic[Job, Result]):
    """`await batcher.run(job, size)` returns `process([..., job, ...])`'s result for `job`, computed together
    with the jobs of other callers that waited meanwhile (at most `max_images` images a run, counted by
    `size`; one job alone may be larger)."""

    def __init__(self, process: Callable[[Sequence[Job]], Sequence[Result]], max_images: int = 256) -> None:
        self.process = process
        self.max_images = max_images
        self._waiting: deque[_Pending[Job]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="model")

    async def run(self, job: Job, size: int) -> Result:
        if size < 1:
            raise ValueError("no inputs")
        loop = asyncio.get_running_loop()
        if self._wakeup is None or self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._serve(self._wakeup))
        pending: _Pending[Job] = _Pending(job, size, loop.create_future())
        self._waiting.append(pending)
        self._wakeup.set()
        return await pending.done

    def _next_group(self) -> list[_Pending[Job]]:
        """The oldest job and as many following ones as fit in max_images (at least one)."""
        group = [self._waiting.popleft()]
        count = group[0].size
        while self._waiting and count + self._waiting[0].size <= self.max_images:
            item = self._waiting.popleft()
            group.append(item)
            count += item.size
        return group

    async def _serve(self, wakeup: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                wakeup.clear()
                await wakeup.wait()
                continue
            group = [item for item in self._next_group() if not item.done.cancelled()]  # a client went away
            if not group:
                continue
            try:
                results = await loop.run_in_executor(self._thread, self.process, [item.job for item in group])
            except Exception as exc:  # every caller of this batch learns of it; the worker goes on
                for item in group:
                    if not item.done.done():
                        item.done.set_exception(exc)
                continue
            if len(results) != len(group):  # a fault of `process`: its callers learn of it, the worker goes on
                fault = RuntimeError(f"the model step returned {len(results)} results for {len(group)} jobs")
                results = [fault] * len(group)
            for item, result in zip(group, results, strict=True):
                if item.done.done():
                    continue
                if isinstance(result, BaseException):
                    item.done.set_exception(result)
                else:
                    item.done.set_result(result)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        self._thread.shutdown(wait=False)
