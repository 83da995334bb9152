"""Dynamic batching: images from concurrent requests gathered into one call of the jitted model.

An image waits in the queue until `max_batch` images are there or the first of them has waited
`max_wait_s`, whichever is first; the batch is padded to the smallest of a few fixed sizes
(powers of two up to `max_batch`, and `max_batch`) so the model only ever sees shapes compiled at
start. The model runs in a thread of its own, off the event loop; each image's row of the result
goes back to the future of the request that sent it, so no request sees another's output.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable

import numpy as np

from jaxclf.serve.metrics import ServerMetrics


def padded_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch shapes the model is compiled for: 1, 2, 4, ... below `max_batch`, then `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"--max_batch {max_batch}: give at least 1")
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return (*sizes, max_batch)


@dataclasses.dataclass(frozen=True)
class ImageResult:
    """One image's logits float32[C] and how it got them."""

    logits: np.ndarray
    queue_s: float  # from entering the queue to the start of its model call
    model_s: float  # the model call it was part of
    batch_images: int  # images in that call (before padding)


@dataclasses.dataclass(eq=False)
class _Waiting:
    image: np.ndarray
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    """Gathers images into padded batches for `logits`, a function uint8[B, H, W, 3] -> float32[B, C]."""

    def __init__(self, logits: Callable[[np.ndarray], np.ndarray], image_shape: tuple[int, int, int], *,
                 max_batch: int, max_wait_s: float, metrics: ServerMetrics):
        self.batch_sizes = padded_sizes(max_batch)
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._logits, self._image_shape, self._metrics = logits, image_shape, metrics
        self._queue: asyncio.Queue[_Waiting] | None = None
        # One thread: the calls run one after another, and the event loop stays free for requests.
        self._model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")

    def warm_up(self) -> None:
        """Compile (and run once) every batch shape, so no request pays a compile. Blocking."""
        for size in self.batch_sizes:
            self._model_thread.submit(self._logits, np.zeros((size, *self._image_shape), np.uint8)).result()

    async def classify(self, images: list[np.ndarray]) -> list[ImageResult]:
        """The results of `images` (each uint8[H, W, 3] of the served shape), in order."""
        loop = asyncio.get_running_loop()
        waiting = [_Waiting(image, loop.create_future(), time.perf_counter()) for image in images]
        for item in waiting:
            self._queue.put_nowait(item)
        self._metrics.queue_depth.set(self._queue.qsize())
        return list(await asyncio.gather(*(item.future for item in waiting)))

    async def run(self) -> None:
        """Serve the queue until cancelled: gather a batch, run it, hand out the rows."""
        self._queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            batch = [item for item in await self._gather() if not item.future.done()]  # done: its client left
            self._metrics.queue_depth.set(self._queue.qsize())
            if not batch:
                continue
            size = next(s for s in self.batch_sizes if s >= len(batch))
            images = np.zeros((size, *self._image_shape), np.uint8)
            for row, item in enumerate(batch):
                images[row] = item.image
            started = time.perf_counter()
            try:
                logits = await loop.run_in_executor(self._model_thread, self._logits, images)
            except Exception as e:  # noqa: BLE001 -- the requests of this batch fail, the server goes on
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            model_s = time.perf_counter() - started
            self._metrics.model_seconds.observe(model_s)
            self._metrics.batch_images.observe(len(batch))
            self._metrics.padded_rows.inc(size - len(batch))
            for row, item in enumerate(batch):
                self._metrics.queue_seconds.observe(started - item.enqueued)
                if not item.future.done():
                    item.future.set_result(ImageResult(logits[row], started - item.enqueued, model_s, len(batch)))

    async def _gather(self) -> list[_Waiting]:
        """The next batch: the oldest waiting image and those after it, until max_batch or its deadline."""
        batch = [await self._queue.get()]
        deadline = batch[0].enqueued + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    def close(self) -> None:
        self._model_thread.shutdown(wait=True, cancel_futures=True)
