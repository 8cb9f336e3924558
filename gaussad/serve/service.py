"""One inspection end to end, and the served models' lifecycle; HTTP stays in `gaussad.serve.app`.

An image is decoded and prepared in the decoding threads, scored in its model's next batch, decided by
`gaussad.decisions`, kept when asked, and recorded in the audit trail; only then is it answered. The
number of images in the service at once is bounded (`max_queue`): one more is refused with 503 at once,
before its body is read, so memory does not grow with the load.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import numpy as np

from gaussad.allocator import keep_freed_memory
from gaussad.decisions import decide, defect_mask
from gaussad.errors import GaussADError, ImageTooLargeError, UnreadableImageError
from gaussad.framing import Window
from gaussad.serve.audit import AuditRecord, AuditStore, AuditWriter
from gaussad.serve.batching import Batcher
from gaussad.serve.decode import decode
from gaussad.serve.drift import DriftMonitor
from gaussad.serve.errors import ServiceError
from gaussad.serve.kept import KeptImages
from gaussad.serve.metrics import ServiceMetrics
from gaussad.serve.runtime import ServedModel, load_served_model
from gaussad.serve.settings import ServeSettings

Result = TypeVar("Result")
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class Prepared:
    """A decoded image, ready for its model's batch."""

    inputs: np.ndarray  # (h, w, 3) uint8: the model input
    size: tuple[int, int]  # (height, width) as decoded
    window: Window  # the part of the image the input shows (the whole image without a crop)
    sha256: str


@dataclass(frozen=True)
class Inspection:
    """One image's answer, as recorded in the audit trail."""

    record: AuditRecord
    model: ServedModel  # the model that scored it
    anomaly_map: np.ndarray | None  # at the image's size, when asked for
    defect_mask: np.ndarray | None  # predict's (`decisions.defect_mask`); None without a pixel threshold


class InspectionService:
    """The served models, their batchers and drift monitors, the threads, the audit trail and the metrics."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.paths = dict(zip(settings.names, settings.model_dirs, strict=True))
        self.models: dict[str, ServedModel] = {
            name: load_served_model(name, path, settings.device) for name, path in self.paths.items()
        }
        self.monitors = {name: self._monitor(model) for name, model in self.models.items()}
        self._batchers: dict[str, Batcher] = {}
        self.metrics = ServiceMetrics(
            lambda: self.monitors, lambda: {name: batcher.waiting for name, batcher in self._batchers.items()}
        )
        for name, model in self.models.items():
            self.metrics.serve_model(name, model.sha256)
        self.store = AuditStore(settings.audit)
        self.kept = KeptImages(settings.keep_images, settings.max_pixels) if settings.keep_images else None
        self.ready = False
        self._admitted = 0
        self._decoding = dict.fromkeys(self.models, 0)  # per model: its batch waits for these images
        self._reloading: dict[str, asyncio.Lock] = {}
        self._resources = ExitStack()

    def _monitor(self, model: ServedModel) -> DriftMonitor:
        return DriftMonitor(model.held_out_scores, model.image_threshold.value, self.settings.drift_window)

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start threads and batchers (inside the running event loop)."""
        settings = self.settings
        self._pool = self._resources.enter_context(
            ThreadPoolExecutor(settings.workers, thread_name_prefix="gaussad decode")
        )
        scoring = self._resources.enter_context(ThreadPoolExecutor(1, thread_name_prefix="gaussad score"))
        if _tuning_enabled():  # a server runs forward passes all its life: keep the allocator warm throughout
            self._resources.enter_context(keep_freed_memory())
        self.audit = AuditWriter(self.store)
        self._resources.callback(self.audit.close)
        for name in self.models:
            self._reloading[name] = asyncio.Lock()
            self._batchers[name] = Batcher(
                name,
                scoring,
                settings.max_batch_size,
                settings.max_queue_delay_ms / 1000,
                self.metrics.observe_batch,
                lambda name=name: self._decoding[name],
            )
            self._batchers[name].start()
        self.ready = True

    async def stop(self) -> None:
        """Stop batchers, store what the audit writer holds, and release the threads."""
        self.ready = False
        for batcher in self._batchers.values():
            await batcher.stop()
        await asyncio.to_thread(self._resources.close)

    async def in_threads(self, function: Callable[..., Result], *args: Any) -> Result:
        """Run blocking work (decoding, pictures, database reads) in the decoding threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    @contextmanager
    def admit(self, images: int = 1) -> Iterator[None]:
        """Hold room for `images` images while a request is served; 503 with Retry-After when full."""
        if self._admitted + images > self.settings.max_queue:
            self.metrics.rejected.labels("queue full").inc(images)
            raise ServiceError(
                503,
                f"queue full ({self._admitted} images in service, limit {self.settings.max_queue}): retry",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self._admitted += images
        self.metrics.in_service.set(self._admitted)
        try:
            yield
        finally:
            self._admitted -= images
            self.metrics.in_service.set(self._admitted)

    def model(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise ServiceError(404, f"no model named {name!r}: serving {', '.join(self.models)}") from None

    async def reload(self, name: str) -> tuple[str, str]:
        """Read a served model's folder or file again (after `gaussad calibrate` or `gaussad export`, say)
        and swap it in between batches: (previous SHA-256, new SHA-256). A model that fails to load leaves
        the old one serving."""
        previous = self.model(name)
        async with self._reloading[name]:
            try:
                model = await asyncio.to_thread(
                    load_served_model, name, self.paths[name], self.settings.device
                )
            except GaussADError as error:
                raise ServiceError(422, f"{error}; still serving {name} {previous.sha256[:12]}") from None
            current = self.models[name]
            if model.sha256 != current.sha256:
                self.models[name] = model
                self.monitors[name] = self._monitor(model)
                self.metrics.serve_model(name, model.sha256, current.sha256)
        return previous.sha256, model.sha256

    # ------------------------------------------------------------------------------------ inspection
    def _prepare(self, model: ServedModel, data: bytes) -> Prepared:
        pixels = decode(data, self.settings.max_pixels)
        inputs, window = model.prepare(pixels)
        return Prepared(inputs, pixels.shape[:2], window, hashlib.sha256(data).hexdigest())

    async def prepare(self, name: str, data: bytes) -> tuple[ServedModel, Prepared]:
        """Decode one encoded image for the model now serving `name` (in the decoding threads): 413 for
        too many pixels, 422 naming the problem for anything not decodable."""
        model = self.model(name)
        self._decoding[name] += 1
        try:
            return model, await self.in_threads(self._prepare, model, data)
        except ImageTooLargeError as error:
            self.metrics.rejected.labels("too large").inc()
            raise ServiceError(413, str(error)) from None
        except UnreadableImageError as error:
            self.metrics.rejected.labels("not decodable").inc()
            raise ServiceError(422, str(error)) from None
        finally:
            self._decoding[name] -= 1

    async def decide(
        self,
        name: str,
        model: ServedModel,
        prepared: Prepared,
        data: bytes,
        *,
        request_id: str,
        client: str | None,
        route: str,
        started: float,
        with_maps: bool,
    ) -> Inspection:
        """Score a prepared image in its model's next batch, decide, keep it when asked, and record the
        decision. `started` is the request's arrival (`time.perf_counter()`), whence the latency."""
        scored = await self._batchers[name].submit(model, prepared.inputs, with_maps)
        used = scored.model
        decision = decide(scored.score, used.image_threshold)
        anomaly_map = mask = None
        if scored.anomaly_map is not None:
            anomaly_map = await self.in_threads(
                used.full_size_map, scored.anomaly_map, prepared.size, prepared.window
            )
            mask = defect_mask(anomaly_map, used.pixel_threshold, decision.is_anomalous)
        if self.kept is not None:
            await self.in_threads(self.kept.keep, prepared.sha256, data)
        height, width = prepared.size
        record = AuditRecord(
            time=datetime.now(timezone.utc),
            request_id=request_id,
            client=client,
            route=route,
            image_sha256=prepared.sha256,
            image_width=width,
            image_height=height,
            image_bytes=len(data),
            image_kept=self.kept is not None,
            model=name,
            model_sha256=used.sha256,
            image_threshold=used.image_threshold.value,
            pixel_threshold=used.pixel_threshold.value if used.pixel_threshold else None,
            score=decision.score,
            normalized_score=decision.normalized_score,
            is_anomalous=decision.is_anomalous,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )
        try:
            await self.audit.record(record)
        except GaussADError as error:
            self.metrics.rejected.labels("audit failed").inc()
            raise ServiceError(
                503, f"the decision could not be recorded, so it is not answered: {error}"
            ) from None
        self.metrics.observe_decision(name, decision.normalized_score, decision.is_anomalous)
        if self.models[name] is used:  # after a reload the window starts afresh with the new model's images
            self.monitors[name].add(decision.score)
        return Inspection(record, used, anomaly_map, mask)

    def latest(self, limit: int, model: str | None, anomalous: bool) -> list[dict[str, Any]]:
        """The latest decisions of the audit trail (blocking: run it `in_threads`)."""
        return self.store.query(model=model, anomalous=anomalous, limit=limit)


def _tuning_enabled() -> bool:
    """Whether a `gaussad.cpu_tuning()` context is active. None can be unless `gaussad.tuning` was imported,
    and importing it imports PyTorch, which a service of exported files does without."""
    tuning = sys.modules.get("gaussad.tuning")
    return tuning is not None and tuning.tuning_enabled()
