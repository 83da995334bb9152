"""The ASGI app (Starlette): classify, explain, model card, health, readiness, metrics and the demo page.

Every error is JSON, `{"error": {"status", "kind", "message"}}`, with the status that says whose
fault it is (400 a bad image or field, 413 too large or too many, 415 a content type it cannot
read, 404 an unknown route, 503 not ready yet); the request fails alone and the server goes on.
Uploads come as multipart files, base64 strings in JSON (`{"images": [...], "top_k": 3}`), or one
raw image body (`Content-Type: image/*` or `application/octet-stream`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import dataclasses
import importlib.resources
import io
import json
import logging
import re
import time

import numpy as np
from PIL import Image
from scipy.special import softmax
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from jaxclf import explain as explain_lib
from jaxclf.data import ops as ops_lib, sources
from jaxclf.predict import top_classes
from jaxclf.serve.batcher import DynamicBatcher, padded_sizes
from jaxclf.serve.metrics import ServerMetrics
from jaxclf.serve.model import ServedModel

log = logging.getLogger("jaxclf.serve")

RAW_IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The server's knobs (the command line's flags)."""

    max_batch: int = 32  # images in one model call
    max_wait_ms: float = 5.0  # longest an image waits for others to fill its batch
    max_upload_mb: float = 20.0  # largest request body
    max_images: int = 64  # images in one request
    default_top_k: int = 5
    decode_workers: int = 4  # threads decoding uploads


class ApiError(Exception):
    """A request the server refuses: its HTTP status, a short machine-readable kind, a message for a person."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclasses.dataclass(frozen=True)
class Upload:
    """One image as it arrived: a name for messages and its encoded bytes."""

    name: str
    data: bytes


class _Server:
    """The state the routes share: the model, the batcher, the pools, readiness."""

    def __init__(self, served: ServedModel, settings: ServeSettings):
        self.served, self.settings = served, settings
        self.image_shape = (*served.input_size, 3)
        self.metrics = ServerMetrics(padded_sizes(settings.max_batch))
        self.batcher = DynamicBatcher(served.logits, self.image_shape, max_batch=settings.max_batch,
                                      max_wait_s=settings.max_wait_ms / 1000, metrics=self.metrics)
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        # Explanations take a backward pass each: one at a time, beside the batcher's model thread.
        self.explain_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="explain")
        self.ready = False
        self.closing = False
        self.warm_up_error: str | None = None

    def warm_up(self) -> None:
        """Compile every batch shape (and the explanation), blocking; then the server is ready."""
        started = time.perf_counter()
        self.batcher.warm_up()
        if self.served.explain is not None:
            self.explain_pool.submit(self.served.explain, np.zeros(self.image_shape, np.uint8), None).result()
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready: compiled batch sizes %s in %.1fs", ",".join(map(str, self.batcher.batch_sizes)),
                 time.perf_counter() - started)

    def close(self) -> None:
        self.closing = True
        self.batcher.close()
        self.decode_pool.shutdown(wait=True, cancel_futures=True)
        self.explain_pool.shutdown(wait=True, cancel_futures=True)

    # ---- requests -------------------------------------------------------------------------------------------

    async def read_uploads(self, request: Request, max_images: int) -> tuple[list[Upload], dict]:
        """(the request's images, its other fields: top_k, class), or ApiError."""
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        if not (media_type in ("multipart/form-data", "application/json") or media_type.startswith(RAW_IMAGE_TYPES)):
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type {content_type or '(none)'!r}: send multipart/form-data files, application/json "
                           'with base64 "images", or one image as image/* or application/octet-stream')
        body = await self._read_body(request)
        fields: dict = dict(request.query_params)
        if media_type == "multipart/form-data":
            uploads = await self._read_multipart(request, body, max_images, fields)
        elif media_type == "application/json":
            uploads = self._read_json(body, max_images, fields)
        else:
            uploads = [Upload("body", body)]
        if not uploads:
            raise ApiError(400, "no_images", "the request holds no image: send one or more files, or base64 \"images\"")
        if len(uploads) > max_images:
            raise ApiError(413, "too_many_images", f"{len(uploads)} images in one request; at most {max_images}")
        return uploads, fields

    async def _read_body(self, request: Request) -> bytes:
        limit = int(self.settings.max_upload_mb * 2**20)
        too_large = ApiError(413, "upload_too_large", f"the request body is over --max_upload_mb {self.settings.max_upload_mb:g}")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def _read_multipart(self, request: Request, body: bytes, max_images: int, fields: dict) -> list[Upload]:
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=max_images, max_fields=16)
        except HTTPException as e:  # Starlette's multipart errors
            if "Too many files" in str(e.detail):
                raise ApiError(413, "too_many_images", f"more than {max_images} images in one request") from None
            raise ApiError(400, "bad_multipart", f"cannot read the multipart body: {e.detail}") from None
        try:
            uploads = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    uploads.append(Upload(value.filename or key, await value.read()))
                else:
                    fields[key] = value
            return uploads
        finally:
            await form.close()

    def _read_json(self, body: bytes, max_images: int, fields: dict) -> list[Upload]:
        try:
            record = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, "bad_json", f"the body is not JSON: {e}") from None
        images = record.get("images") if isinstance(record, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ApiError(400, "bad_request", 'send a JSON object with "images": a list of base64 strings')
        if len(images) > max_images:
            raise ApiError(413, "too_many_images", f"{len(images)} images in one request; at most {max_images}")
        fields.update({k: v for k, v in record.items() if k != "images"})
        uploads = []
        for index, text in enumerate(images):
            encoded = text.split(",", 1)[1] if text.startswith("data:") else text  # a data URL's payload
            try:
                uploads.append(Upload(f"images[{index}]", base64.b64decode(encoded, validate=True)))
            except (binascii.Error, ValueError):
                raise ApiError(400, "bad_base64", f"images[{index}] is not valid base64") from None
        return uploads

    def top_k(self, fields: dict) -> int:
        value = fields.get("top_k", self.settings.default_top_k)
        try:
            k = int(value)
        except (TypeError, ValueError):
            k = 0
        if k < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ApiError(400, "bad_request", f"top_k={value!r}: give a whole number >= 1")
        return min(k, len(self.served.class_names))

    def check_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "not_ready", "the model is still compiling; poll /readyz")

    def decode(self, upload: Upload) -> tuple[np.ndarray, float]:
        """(the upload as the model's uint8[H, W, 3] input, seconds it took) or ApiError; runs in the decode pool."""
        started = time.perf_counter()
        try:
            image = self.served.load_image(upload.name, upload.data)
        except ops_lib.TooManyPixels as e:
            raise ApiError(413, "too_many_pixels",
                           f"{upload.name}: {e.width}x{e.height} = {e.width * e.height:,} pixels, over this server's limit "
                           f"of {e.limit:,} pixels (max_image_pixels in /v1/model); refused before decoding") from None
        except ops_lib.BadImage as e:
            if e.reason.startswith("DecompressionBombError"):  # over twice Pillow's own limit: Pillow refused first
                raise ApiError(413, "too_many_pixels",
                               f"{upload.name}: over this server's limit of {self.served.max_image_pixels:,} pixels "
                               f"(max_image_pixels in /v1/model); refused before decoding ({e.reason})") from None
            raise ApiError(400, *_bad_image(upload.name, without_host_paths(e.reason))) from None
        except (sources.DataError, ValueError, OSError) as e:  # e.g. an image smaller than the eval crop
            raise ApiError(400, "bad_image",
                           f"{upload.name}: cannot preprocess the image ({without_host_paths(str(e))})") from None
        if image.shape != self.image_shape:
            raise ApiError(400, "wrong_size",
                           f"{upload.name} is {image.shape[0]}x{image.shape[1]} after the run's preprocessing "
                           f"({self.served.preprocessing.get('pp_eval')}); this model takes "
                           f"{self.image_shape[0]}x{self.image_shape[1]} images")
        return image, time.perf_counter() - started

    async def decode_all(self, uploads: list[Upload]) -> list[np.ndarray]:
        """The uploads decoded in the pool, in order (ApiError for the first that cannot be)."""
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, self.decode, u) for u in uploads),
                                       return_exceptions=True)  # every one collected: none left unretrieved
        for outcome in decoded:
            if isinstance(outcome, BaseException):
                raise outcome
        for _, seconds in decoded:
            self.metrics.decode_seconds.observe(seconds)
        return [image for image, _ in decoded]


# An absolute path inside a message: what a client is not told (the server's disk layout).
_HOST_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/:,()]+/)+([^\s'\"/:,()]*)")


def without_host_paths(text: str) -> str:
    """`text` with every absolute path replaced by its base name: error text from exceptions, fit for a client."""
    return _HOST_PATH.sub(lambda match: match.group(1) or "<folder>", text)


def _bad_image(name: str, reason: str) -> tuple[str, str]:
    """(kind, message) for an image Pillow cannot read, from its reason ("ExceptionType: message")."""
    if reason.startswith("UnidentifiedImageError"):
        return "not_an_image", f"{name}: not an image file Pillow can read (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)"
    if "truncated" in reason.lower():
        return "truncated_image", f"{name}: the image file is truncated ({reason})"
    return "bad_image", f"{name}: cannot decode the image ({reason})"


def _png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _milliseconds(seconds: float) -> float:
    return round(seconds * 1000, 3)


def create_app(served: ServedModel, settings: ServeSettings = ServeSettings()) -> Starlette:
    """The app serving `served`; it compiles in the background at start-up and is ready (/readyz 200) after."""
    server = _Server(served, settings)
    page = importlib.resources.files("jaxclf.serve").joinpath("page.html").read_text()

    async def classify(request: Request) -> Response:
        server.check_ready()
        started = time.perf_counter()
        uploads, fields = await server.read_uploads(request, settings.max_images)
        top_k = server.top_k(fields)
        read = time.perf_counter()
        images = await server.decode_all(uploads)
        decoded = time.perf_counter()
        results = await server.batcher.classify(images)
        server.metrics.images.inc(len(images))
        predictions = []
        for upload, result in zip(uploads, results):
            classes, probabilities = top_classes(softmax(result.logits), served.class_names, top_k)
            predictions.append({"image": upload.name, "classes": classes, "probabilities": probabilities,
                                "batch_images": result.batch_images})
        return JSONResponse({
            "model": served.name,
            "checkpoint_step": served.step,
            "predictions": predictions,
            "latency_ms": {
                "total": _milliseconds(time.perf_counter() - started),
                "read": _milliseconds(read - started),
                "decode": _milliseconds(decoded - read),
                "queue": _milliseconds(max(r.queue_s for r in results)),
                "model": _milliseconds(max(r.model_s for r in results)),
            },
        })

    async def explain(request: Request) -> Response:
        server.check_ready()
        if served.explain is None:
            raise ApiError(501, "explain_unavailable",
                           f"{served.name} ({served.provenance.get('format')}) offers no explanation: Grad-CAM needs the "
                           "model's forward_features/forward_head, attention rollout its attention layers (not in an artefact)")
        uploads, fields = await server.read_uploads(request, 1)
        (image,) = await server.decode_all(uploads)
        class_name = fields.get("class") or None
        if class_name is not None and class_name not in served.class_names:
            raise ApiError(400, "bad_request", f"class={class_name!r} is not a class of this model")
        loop = asyncio.get_running_loop()
        explanation = await loop.run_in_executor(server.explain_pool, served.explain, image, class_name)
        return JSONResponse({
            **{k: explanation[k] for k in ("method", "where", "class", "probability", "predicted", "predicted_probability")},
            "image_png": _png_data_url(image),
            "overlay_png": _png_data_url(explain_lib.blend_heatmap(image, explanation["heatmap"])),
        })

    async def model_card(request: Request) -> Response:
        return JSONResponse({
            "model": served.name,
            "classes": list(served.class_names),
            "num_classes": len(served.class_names),
            "input_size": list(served.input_size),
            "checkpoint_step": served.step,
            "preprocessing": served.preprocessing,
            "provenance": served.provenance,
            "explain": served.explain_method,
            "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                         "batch_sizes": list(server.batcher.batch_sizes)},
            "limits": {"max_upload_mb": settings.max_upload_mb, "max_images": settings.max_images,
                       "max_image_pixels": served.max_image_pixels},
        })

    async def healthz(request: Request) -> Response:
        if server.warm_up_error:
            raise ApiError(500, "warm_up_failed", f"compiling the model failed: {without_host_paths(server.warm_up_error)}")
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if server.warm_up_error:
            raise ApiError(503, "warm_up_failed", f"compiling the model failed: {without_host_paths(server.warm_up_error)}")
        server.check_ready()
        return JSONResponse({"status": "ready", "batch_sizes": list(server.batcher.batch_sizes)})

    async def metrics(request: Request) -> Response:
        text, content_type = server.metrics.render()
        return Response(text, media_type=content_type)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def api_error(request: Request, e: ApiError) -> Response:
        server.metrics.errors.labels(e.kind).inc()
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse({"error": {"status": e.status, "kind": e.kind, "message": e.message}}, e.status, headers)

    async def http_error(request: Request, e: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        message = (f"no route {request.method} {request.url.path}; see GET / for the page and /v1/model"
                   if e.status_code == 404 else str(e.detail))
        return await api_error(request, ApiError(e.status_code, kind, message))

    async def internal_error(request: Request, e: Exception) -> Response:
        log.exception("error answering %s %s", request.method, request.url.path)
        return await api_error(request, ApiError(500, "internal", without_host_paths(f"{type(e).__name__}: {e}")))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        batching = asyncio.create_task(server.batcher.run())
        warming = asyncio.create_task(asyncio.to_thread(_warm_up, server))
        try:
            yield
        finally:
            for task in (warming, batching):
                task.cancel()
            await asyncio.gather(warming, batching, return_exceptions=True)
            server.close()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/v1/explain", explain, methods=["POST"]),
        Route("/v1/model", model_card, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(_CountRequests, metrics=server.metrics, known_routes={r.path for r in routes})],
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error})
    app.state.server = server
    return app


def _warm_up(server: _Server) -> None:
    try:
        server.warm_up()
    except Exception as e:  # noqa: BLE001 -- reported by /healthz and /readyz, and logged
        if server.closing:  # stopped while compiling: the pools are gone, nothing failed
            return
        server.warm_up_error = f"{type(e).__name__}: {e}"
        log.exception("compiling the model failed")


class _CountRequests:
    """ASGI middleware: count every HTTP response by route and status, and time it."""

    def __init__(self, app, metrics: ServerMetrics, known_routes: set[str]):
        self.app, self.metrics, self.known_routes = app, metrics, known_routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.known_routes else "other"
        started, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
