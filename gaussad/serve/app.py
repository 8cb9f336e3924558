"""The HTTP routes: gaussad's own (`/v1`), the Open Inference Protocol's (`/v2`, KServe v2), `/metrics`
and the review page (`/`). Each route parses, calls `InspectionService` and formats; errors are answered
as {"error": "..."} with their status."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import signal
import threading
import uuid
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from gaussad import __version__
from gaussad.serve.answers import infer_outputs, inspect_answer
from gaussad.serve.errors import ServiceError
from gaussad.serve.guard import Guard
from gaussad.serve.payloads import image_bytes, infer_images, read_body
from gaussad.serve.service import InspectionService
from gaussad.serve.settings import ServeSettings

REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: safe in headers, logs and the audit trail
INFER_OUTPUTS = [
    {"name": "score", "datatype": "FP64", "shape": [-1]},
    {"name": "normalized_score", "datatype": "FP64", "shape": [-1]},
    {"name": "is_anomalous", "datatype": "BOOL", "shape": [-1]},
    {"name": "anomaly_map", "datatype": "FP32", "shape": [-1, -1, -1]},
]
ALL_OUTPUTS = [output["name"] for output in INFER_OUTPUTS]
DEFAULT_OUTPUTS = {"score", "normalized_score", "is_anomalous"}
log = logging.getLogger("uvicorn.error")  # the server's log


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(content), status, headers, media_type="application/json")


def _page() -> tuple[bytes, str]:
    """The review page and its Content-Security-Policy: only its own inline script and style (by hash),
    requests to this server, images from it or from data and blob URLs."""
    html = files("gaussad.serve").joinpath("page.html").read_text()

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        digests = [base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks]
        return " ".join(f"'sha256-{digest}'" for digest in digests)

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html.encode(), policy


def _request_id(request: Request, given: str | None = None) -> str:
    """The caller's request id (X-Request-ID, or the infer request's id), else a new one."""
    given = request.headers.get("x-request-id") or given
    if given is None:
        return uuid.uuid4().hex
    if not isinstance(given, str) or not REQUEST_ID.fullmatch(given):
        raise ServiceError(400, "request id: 1 to 128 visible ASCII characters")
    return given


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def create_app(settings: ServeSettings) -> FastAPI:
    """The service's app; loads the models and opens the audit store now, so that a model folder that
    fails its checksums, a file that is no gaussad export or an unreachable store stops start-up with a
    `GaussADError`."""
    service = InspectionService(settings)
    page, policy = _page()

    async def reload_all() -> None:
        for name in service.models:
            try:
                previous, current = await service.reload(name)
            except ServiceError as error:
                log.error("SIGHUP: %s", error.message)
            else:
                log.info("SIGHUP: %s %s -> %s", name, previous[:12], current[:12])

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await service.start()
        # SIGHUP reloads every model, where signals can be received (`gaussad serve`'s main thread).
        hangup = threading.current_thread() is threading.main_thread()
        if hangup:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_all()))
        try:
            yield
        finally:
            if hangup:
                loop.remove_signal_handler(signal.SIGHUP)
            await service.stop()

    app = FastAPI(
        title="gaussad",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    app.add_middleware(Guard, keys=settings.api_keys, metrics=service.metrics)

    @app.exception_handler(ServiceError)
    async def refused(request: Request, error: ServiceError) -> Response:
        return json_response({"error": error.message}, error.status, error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        return json_response({"error": str(error.detail)}, error.status_code, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> Response:  # a fault of the service, logged
        return json_response({"error": f"internal error ({type(error).__name__}); see the server's log"}, 500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(f"{' '.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return json_response({"error": problems}, 422)

    # ------------------------------------------------------------------------------ gaussad's own
    @app.get("/")
    async def review_page() -> Response:
        return Response(page, media_type="text/html", headers={"Content-Security-Policy": policy})

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response(
            [
                {
                    "name": name,
                    "model_sha256": model.sha256,
                    "image_threshold": model.image_threshold.value,
                    "pixel_threshold": model.pixel_threshold.value if model.pixel_threshold else None,
                }
                for name, model in service.models.items()
            ]
        )

    @app.post("/v1/models/{name}/inspect")
    async def inspect(name: str, request: Request, with_map: bool = Query(False, alias="map")) -> Response:
        request_id = _request_id(request)
        service.model(name)  # an unknown model is refused before the body is read
        with service.admit():
            body = await read_body(
                request.stream(), request.headers.get("content-length"), settings.max_body_bytes
            )
            data = image_bytes(body, request.headers.get("content-type"))
            model, prepared = await service.prepare(name, data)
            inspection = await service.decide(
                name,
                model,
                prepared,
                data,
                request_id=request_id,
                client=_client(request),
                route="inspect",
                started=request.state.started,
                with_maps=with_map,
            )
            # Pictures are encoded in a thread; an answer without them is ready at once.
            answer = (
                await service.in_threads(inspect_answer, inspection)
                if with_map
                else inspect_answer(inspection)
            )
        return json_response(answer, headers={"X-Request-ID": request_id})

    @app.get("/v1/decisions")
    async def latest_decisions(
        limit: int = Query(20, ge=1, le=1000), model: str | None = None, anomalous: bool = False
    ) -> Response:
        rows = await service.in_threads(service.latest, limit, model, anomalous)
        for row in rows:
            row["time"] = row["time"].isoformat()
            row["thumbnail"] = f"/v1/images/{row['image_sha256']}" if row["image_kept"] else None
        return json_response(rows)

    @app.get("/v1/images/{sha256}")
    async def kept_image(sha256: str) -> Response:
        thumbnail = await service.in_threads(service.kept.thumbnail, sha256) if service.kept else None
        if thumbnail is None:
            raise ServiceError(404, f"no kept image {sha256[:64]!r}")
        return Response(thumbnail, media_type="image/png")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await service.in_threads(service.metrics.render), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ Open Inference Protocol (v2)
    @app.get("/v2")
    async def server_metadata() -> Response:
        return json_response({"name": "gaussad", "version": __version__, "extensions": ["model_repository"]})

    @app.get("/v2/health/live")
    async def live() -> Response:
        return json_response({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return json_response({"ready": service.ready}, 200 if service.ready else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> Response:
        model = service.model(name)
        drift = await service.in_threads(service.monitors[name].report)
        return json_response(
            {
                "name": name,
                "versions": [model.sha256],
                "platform": model.platform,
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                "outputs": INFER_OUTPUTS,
                "model_sha256": model.sha256,
                **model.describe(),
                "drift": drift.as_dict(),
            }
        )

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        service.model(name)
        return json_response({"name": name, "ready": service.ready}, 200 if service.ready else 503)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        service.model(name)
        with service.admit():
            body = await read_body(
                request.stream(), request.headers.get("content-length"), settings.max_body_bytes
            )
            images, infer_request = infer_images(body)
            request_id = _request_id(request, infer_request.get("id"))
            wanted = {
                o.get("name") for o in infer_request.get("outputs") or [] if isinstance(o, dict)
            } or None
            unknown = sorted(map(str, (wanted or set()) - set(ALL_OUTPUTS)))
            if unknown:
                raise ServiceError(
                    422, f"unknown outputs {', '.join(unknown)}: expected {', '.join(ALL_OUTPUTS)}"
                )
            with_maps = wanted is not None and "anomaly_map" in wanted
            with service.admit(len(images)):
                prepared = await asyncio.gather(*(service.prepare(name, data) for data in images))
                if with_maps and len({p.size for _, p in prepared}) > 1:
                    raise ServiceError(
                        422, "anomaly_map of images of different sizes: send them one at a time"
                    )
                ids = [request_id] if len(images) == 1 else [f"{request_id}/{i}" for i in range(len(images))]
                inspections = await asyncio.gather(
                    *(
                        service.decide(
                            name,
                            model,
                            image,
                            data,
                            request_id=image_id,
                            client=_client(request),
                            route="infer",
                            started=request.state.started,
                            with_maps=with_maps,
                        )
                        for (model, image), data, image_id in zip(prepared, images, ids, strict=True)
                    )
                )
                outputs = await service.in_threads(infer_outputs, inspections, wanted or DEFAULT_OUTPUTS)
        used = inspections[0].record
        return json_response(
            {
                "model_name": name,
                "model_version": used.model_sha256,
                "id": request_id,
                "parameters": {"request_ids": ids, "model_sha256": used.model_sha256},
                "outputs": outputs,
            },
            headers={"X-Request-ID": request_id},
        )

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str) -> Response:
        previous, current = await service.reload(name)
        return json_response(
            {
                "name": name,
                "load": True,
                "model_sha256": current,
                "previous_sha256": previous,
                "swapped": current != previous,
            }
        )

    return app
