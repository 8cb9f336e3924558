"""Dynamic batching: requests that arrive together are scored in one forward pass.

Per served name, a queue and a task gather requests until `max_batch_size` are waiting or the first has
waited `max_delay` seconds (Triton's dynamic batcher), then score them in the scoring thread, which all
models share so that forward passes never compete for the cores. The batch waits only while more images
are on their way (being decoded): a lone request is scored at once, so batching costs no latency when
requests come one at a time. The event loop never runs model code.

A request is scored by the model that was current when it arrived (its inputs were prepared for that
model's input size), so a batch holds one model's requests: a reload swaps models between batches.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from gaussad.serve.runtime import ServedModel


@dataclass
class Job:
    """One image waiting to be scored."""

    model: ServedModel
    inputs: np.ndarray  # (h, w, 3) uint8, prepared for `model`
    with_maps: bool
    done: asyncio.Future = field(repr=False)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Scored:
    """A job's result, with the model that scored it."""

    model: ServedModel
    score: float
    anomaly_map: np.ndarray | None  # (h, w) float32 when maps were asked for


BatchObserver = Callable[[str, int, list[float]], None]  # (model name, batch size, queue seconds)


class Batcher:
    """Gathers one served name's jobs into batches and scores them in `executor`."""

    def __init__(
        self,
        name: str,
        executor: Executor,
        max_batch_size: int,
        max_delay: float,
        observe: BatchObserver,
        coming: Callable[[], int],
    ) -> None:
        self.name = name
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_delay = max_delay
        self._observe = observe
        self._coming = coming  # images on their way to this batcher
        self._pending: deque[Job] = deque()  # bounded by the service's admission limit
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Jobs waiting for a forward pass."""
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher {self.name}")

    async def stop(self) -> None:
        """Stop the task; jobs still waiting (none once the server has drained its requests) fail."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._pending:
            self._pending.popleft().done.cancel()

    async def submit(self, model: ServedModel, inputs: np.ndarray, with_maps: bool) -> Scored:
        """Score one prepared image in the next batch of its model."""
        job = Job(model, inputs, with_maps, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._arrived.set()
        return await job.done

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for a new job (at most `timeout` seconds); False when none came."""
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _gather(self) -> list[Job]:
        """The next batch: the first job, then whatever arrives until it is full, the first has waited the
        delay, or no more are coming. Jobs queued during the previous forward pass join without waiting."""
        while not self._pending:
            await self._wait(None)
        jobs = [self._pending.popleft()]
        deadline = jobs[0].queued_at + self._max_delay
        while len(jobs) < self._max_batch_size:
            if self._pending:
                jobs.append(self._pending.popleft())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not self._coming() or not await self._wait(remaining):
                break
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            for model in {id(job.model): job.model for job in jobs}.values():  # two only across a reload
                await self._score(loop, model, [job for job in jobs if job.model is model])

    async def _score(self, loop: asyncio.AbstractEventLoop, model: ServedModel, jobs: list[Job]) -> None:
        started = time.perf_counter()
        waits = [started - job.queued_at for job in jobs]
        with_maps = any(job.with_maps for job in jobs)
        try:
            scores, maps = await loop.run_in_executor(
                self._executor, _score_batch, model, [job.inputs for job in jobs], with_maps
            )
        except Exception as error:  # a fault of the runtime, not of an input: those requests fail alone
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(error)
            return
        self._observe(self.name, len(jobs), waits)
        for index, job in enumerate(jobs):
            if not job.done.done():  # a request cancelled meanwhile leaves a cancelled future
                anomaly_map = maps[index] if maps is not None and job.with_maps else None
                job.done.set_result(Scored(model, float(scores[index]), anomaly_map))


def _score_batch(
    model: ServedModel, inputs: list[np.ndarray], with_maps: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    return model.score(np.stack(inputs), with_maps)
