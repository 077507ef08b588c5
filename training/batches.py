"""Where a training step's images come from: the whole set on the device, or streamed from a store.

Small in-memory data is copied to the device once as one uint8 NCHW tensor and each step indexes it
(the fast path: no host work per step). A memory-mapped store (training/image_store.py), or an in-memory set
above STREAM_ABOVE_BYTES, is never copied whole: each step's images are read from it in ascending
index order (runs of neighbours in one read, training/chunks.py), put back in the permutation's order,
and a background thread reads PREFETCH_BATCHES steps ahead. On CUDA the thread fills pinned host
memory and the copy to the device is asynchronous (non_blocking), overlapping the previous step's
compute. Both paths hand the augmentation the same uint8 NCHW batch in the same order, so a run
trained from a store equals one trained from the same images in memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from training.chunks import gather_rows

STREAM_ABOVE_BYTES = 8 << 30  # in-memory sets larger than this are streamed too (a second copy would not fit)
PREFETCH_BATCHES = 3


def wants_streaming(images: np.ndarray) -> bool:
    return isinstance(images, np.memmap) or images.nbytes > STREAM_ABOVE_BYTES


class DeviceImages:
    """The whole set as one uint8 NCHW tensor on the device."""

    streamed = False

    def __init__(self, images: np.ndarray, device: torch.device) -> None:
        self.device = device
        writable = images if images.flags.writeable else images.copy()  # torch wants writable memory
        self.images = torch.from_numpy(writable).permute(0, 3, 1, 2).contiguous().to(device)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices.to(self.device)]

    def iterate(self, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        for indices in batches:
            yield self.gather(indices)


class StreamedImages:
    """Each batch read from the (memory-mapped) array when needed, a few steps ahead in a thread."""

    streamed = True

    def __init__(self, images: np.ndarray, device: torch.device, prefetch: int = PREFETCH_BATCHES) -> None:
        self.images, self.device, self.prefetch = images, device, prefetch
        self.pin = device.type == "cuda"

    def _host_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC on the host (pinned on CUDA), rows in the order of `indices`."""
        rows = torch.from_numpy(gather_rows(self.images, indices.numpy()))
        return rows.pin_memory() if self.pin else rows

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        # NHWC -> NCHW on the device: the transfer moves the compact uint8 rows as they were read.
        return host.to(self.device, non_blocking=self.pin).permute(0, 3, 1, 2).contiguous()

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return self._to_device(self._host_batch(indices))

    def iterate(self, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The batches' images in order; reading runs ahead in a daemon thread, which stops when the
        consumer stops early (a stop signal ends the epoch) and passes its errors on."""
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for indices in batches:
                    if stop.is_set():
                        return
                    item = self._host_batch(indices)
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as exc:  # handed to the training thread, which raises it
                ready.put(exc)

        worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
        worker.start()
        try:
            for _ in range(len(batches)):
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield self._to_device(item)
        finally:
            stop.set()
            worker.join(timeout=10)


def image_source(images: np.ndarray, device: torch.device) -> DeviceImages | StreamedImages:
    return StreamedImages(images, device) if wants_streaming(images) else DeviceImages(images, device)
