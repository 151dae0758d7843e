"""The HTTP API and the web page (`cvr serve`): FastAPI over one loaded query pipeline.

Routes (versioned; OpenAPI at /docs): `POST /v1/search`; `GET /v1/videos/{id}` and its
`/thumbnail` and `/file` (HTTP Range, so a browser can seek); `GET /v1/anchors/{name}.png`;
`POST /v1/videos` (an index job) and `DELETE /v1/videos/{id}` (need the API key); `GET
/v1/jobs/{id}`; `/healthz`, `/readyz`, `/metrics` (Prometheus); the page at `/` and its assets
under `/static`. Model work runs on one worker thread behind the micro-batcher
(engine/serve/batcher.py), never on the event loop. Files are served by gallery id only: a path
never comes from the request.
"""
from __future__ import annotations

import asyncio
import hmac
import os
import random
import re
import time
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.base import BaseHTTPMiddleware

from engine.errors import CVRError, UnavailableError
from engine.serve.batcher import MicroBatcher, QueueFull
from engine.serve.metrics import Metrics
from engine.serve.state import MAX_BODY_BYTES, MAX_K, MAX_QUERIES, MAX_QUERY_CHARS, GalleryHolder, Jobs, ServeConfig

STATIC = os.path.join(os.path.dirname(__file__), "static")
ANCHOR_NAME = re.compile(r"^[0-9a-f]{16}$")
DOCS_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
               "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Every asset is the app's own: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; media-src 'self'; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
}


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[str] = Field(min_length=1, max_length=MAX_QUERIES,
                               description=f"English text queries, 1 to {MAX_QUERIES}, each at most "
                                           f"{MAX_QUERY_CHARS} characters")
    k: int = Field(10, ge=1, le=MAX_K, strict=True)
    where: list[str] = Field(default_factory=list, max_length=16,
                             description="metadata filters FIELD OP VALUE, e.g. 'duration>=10', 'tag=cooking'")
    mode: Literal["auto", "exhaustive", "two-stage"] = "auto"


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1, max_length=10000,
                             description="files or folders, relative to the gallery's media root")


def create_app(config: ServeConfig, retriever, make_batcher=None) -> FastAPI:
    """The app over a loaded Retriever (models are loaded by the caller, once). `make_batcher(run,
    metrics)`: what coalesces requests into `run(texts, key)` calls (default: the micro-batcher;
    a Ray Serve replica passes its @serve.batch, engine/cluster/ray_serve.py)."""
    holder = GalleryHolder(retriever)
    metrics = Metrics()
    jobs = Jobs(config, on_commit=lambda: metrics.gallery_videos.set(len(holder.current(force=True).gallery)))

    def run(texts: list, key: tuple) -> list:
        return _run_search(holder, texts, key, metrics)

    if make_batcher is None:
        batcher = MicroBatcher(run, config.max_batch, config.max_wait_ms, config.max_queue,
                               on_batch=metrics.batch_size.observe)
    else:
        batcher = make_batcher(run, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        jobs.stopping.clear()  # an app may be started again after a stop (a test client entered twice)
        batcher.start()
        metrics.gallery_videos.set(len(holder.current().gallery))
        yield
        jobs.stop()  # an index job commits its batch in flight, the rest is abandoned
        await batcher.stop()

    app = FastAPI(title="CVR-SDGM", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Text-to-video retrieval. Queries are English: the text encoders are.")
    app.state.holder, app.state.jobs, app.state.batcher, app.state.metrics = holder, jobs, batcher, metrics
    app.add_middleware(_Guard, metrics=metrics)
    app.add_middleware(_BodyLimit)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    docs_assets = _swagger_assets()
    if docs_assets:
        app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        """Swagger UI from the swagger-ui-bundle package (no CDN), started by /static/docs.js."""
        if not docs_assets:
            return JSONResponse({"detail": "the API docs page needs swagger-ui-bundle (pip install "
                                           "'cvr-sdgm[serve]'); the schema is at /openapi.json"}, status_code=404)
        # Swagger UI sets inline styles: this page alone allows them.
        headers = dict(SECURITY_HEADERS, **{"Content-Security-Policy": DOCS_POLICY})
        return FileResponse(os.path.join(STATIC, "docs.html"), headers=headers)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.queue_depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def writer(request: Request) -> None:
        if config.read_only:
            raise HTTPException(403, "this server is read-only (--read-only)")
        if not config.api_key:
            raise HTTPException(403, "writes need an API key: start the server with --api-key-file")
        _check_key(request, config.api_key)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"), headers=SECURITY_HEADERS)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        current = holder.current()
        return {"status": "ready", "videos": len(current.gallery), "backend": current.backend,
                "queue": batcher.depth, "media": current.gallery.has_media}

    @app.post("/v1/search")
    async def search(body: SearchRequest):
        texts = _clean_queries(body.queries)
        current = holder.current()
        where = tuple(body.where)
        try:
            current.allowed(list(where))  # bad syntax or an unknown field: 400 before queueing
        except CVRError as error:
            raise HTTPException(400, str(error)) from None
        if body.k > len(current.gallery):
            raise HTTPException(400, f"k {body.k} is more than the gallery's {len(current.gallery)} videos")
        started = time.perf_counter()
        metrics.queue_depth.set(batcher.depth)
        try:
            answers = await batcher.submit(texts, (body.k, body.mode, where), config.timeout_s)
        except QueueFull:
            metrics.rejected.inc()
            # Retry-After is whole seconds: 1 or 2 at random, so refused clients do not all come back at once.
            return JSONResponse({"detail": "the server is busy: try again shortly"}, status_code=503,
                                headers={"Retry-After": str(random.choice((1, 2)))})
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within {config.timeout_s:g} s") from None
        except UnavailableError as error:  # a shard down or too slow: not the request's fault
            return JSONResponse({"detail": str(error).splitlines()[0]}, status_code=503, headers={"Retry-After": "5"})
        except CVRError as error:
            raise HTTPException(400, str(error).splitlines()[0]) from None
        results = [_as_json(result, timings) for result, timings in answers]
        return {"results": results, "seconds": round(time.perf_counter() - started, 6)}

    @app.get("/v1/videos/{video_id:path}/thumbnail")
    async def thumbnail(video_id: str):
        gallery, row = await _video_off_loop(holder, video_id)
        path = gallery.thumbnail(row)
        if not path or not os.path.isfile(path):
            raise HTTPException(404, f"video {video_id!r} has no thumbnail")
        return FileResponse(path, media_type="image/jpeg")

    @app.get("/v1/videos/{video_id:path}/file")
    async def video_file(video_id: str):
        gallery, _ = await _video_off_loop(holder, video_id)
        paths = [p for p in gallery.paths(video_id) if os.path.isfile(p) and _within(gallery.media_root, p)]
        if not paths:
            raise HTTPException(404, f"video {video_id!r} has no file on this server")
        return FileResponse(paths[0], media_type=_media_type(paths[0]))  # Range requests: 206 / 416

    @app.get("/v1/videos/{video_id:path}")
    async def video(video_id: str):
        gallery, row = await _video_off_loop(holder, video_id)
        record = gallery.record(row) or {}
        return {"id": video_id, "paths": [os.path.relpath(p, gallery.media_root) for p in gallery.paths(video_id)]
                if gallery.has_media else [], "record": record,
                "fields": gallery.metadata_of(video_id),
                "thumbnail": f"/v1/videos/{video_id}/thumbnail" if gallery.thumbnail(row) else None,
                "file": f"/v1/videos/{video_id}/file" if gallery.has_media else None}

    @app.get("/v1/anchors/{name}.png")
    async def anchor(name: str):
        cache = holder.current().anchor_cache
        if not cache or not ANCHOR_NAME.match(name):
            raise HTTPException(404, "no such anchor")
        path = os.path.join(cache, "png", f"{name}.png")
        if not os.path.isfile(path):
            raise HTTPException(404, "no such anchor")
        return FileResponse(path, media_type="image/png")

    @app.post("/v1/videos", status_code=202, dependencies=[Depends(writer)])
    async def add_videos(body: IndexRequest):
        gallery = holder.current().gallery
        if not gallery.has_media:
            raise HTTPException(409, "this gallery was built from feature files: it cannot index video files")
        paths = [_inside(gallery.media_root, p) for p in body.paths]
        files_to_index = _files_inside(gallery.media_root, paths)
        if not files_to_index:
            raise HTTPException(400, "no video file under those paths (or only links to outside the media root)")
        job = jobs.submit(files_to_index, [os.path.relpath(p, gallery.media_root) for p in files_to_index])
        return {"job": job.id, "status": job.status, "url": f"/v1/jobs/{job.id}"}

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str):
        job = jobs.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job.to_dict()

    @app.delete("/v1/videos/{video_id:path}", dependencies=[Depends(writer)])
    async def delete_video(video_id: str):
        from engine.ingest import remove_videos

        _video(holder, video_id)
        try:
            manifest = await asyncio.get_running_loop().run_in_executor(None, remove_videos, config.gallery,
                                                                        [video_id])
        except CVRError as error:
            raise HTTPException(409, str(error).splitlines()[0]) from None
        holder.current(force=True)
        metrics.gallery_videos.set(manifest["count"])
        return {"deleted": video_id, "videos": manifest["count"]}

    @app.exception_handler(CVRError)
    async def cvr_error(_request, error: CVRError):
        return JSONResponse({"detail": str(error).splitlines()[0]}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        """422 as FastAPI words it, without echoing the input: a NaN or a lone surrogate in it
        cannot be written back as JSON (FastAPI's own answer would then be a 500)."""
        details = [{k: v for k, v in item.items() if k in ("type", "loc", "msg")} for item in error.errors()]
        return JSONResponse({"detail": details}, status_code=422)

    return app


# ---------------------------------------------------------------------------------------------


def _run_search(holder: GalleryHolder, texts: list, key: tuple, metrics: Metrics) -> list:
    """One batch on the model thread: [(SearchResult, per-query stage ms)] in the order of texts."""
    from engine.search import SearchOptions

    k, mode, where = key
    current = holder.current()
    results = current.search(texts, k=min(k, len(current.gallery)), options=SearchOptions(mode=mode),
                             where=list(where))
    per_query = current.last_timings.per_query_ms()
    for stage, value in per_query.items():  # once per query: a batch of 8 weighs 8 times a batch of 1
        for _ in texts:
            metrics.stage_seconds.labels(stage).observe(value / 1000.0)
    metrics.gallery_videos.set(len(current.gallery))
    timings = dict(per_query, batch=len(texts), mode=current.last_timings.mode)
    return [(result, timings) for result in results]


def _clean_queries(queries: list) -> list:
    cleaned = []
    for i, text in enumerate(queries, 1):
        if not text.strip():
            raise HTTPException(400, f"query {i} is empty or whitespace only")
        if len(text) > MAX_QUERY_CHARS:
            raise HTTPException(400, f"query {i} is {len(text)} characters, over the limit of {MAX_QUERY_CHARS}")
        if "\x00" in text:
            raise HTTPException(400, f"query {i} holds a NUL character")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(400, f"query {i} is not valid Unicode text (a lone surrogate)") from None
        cleaned.append(" ".join(text.split()))
    return cleaned


def _as_json(result, timings: dict) -> dict:
    hits = []
    for rank, ((video_id, score), detail) in enumerate(zip(result.hits, result.details, strict=True), start=1):
        has_thumbnail = bool(detail["thumbnail"])
        hits.append({"rank": rank, "id": video_id, "score": score,
                     "path": detail.get("relative_path"),
                     "segment": detail["segment"], "segment_score": detail["segment_score"],
                     "thumbnail": f"/v1/videos/{video_id}/thumbnail" if has_thumbnail else None,
                     "file": f"/v1/videos/{video_id}/file" if detail["path"] else None})
    anchor = result.anchor and f"/v1/anchors/{os.path.basename(result.anchor)}"
    return {"query": result.query, "hits": hits, "anchor": anchor, "timings_ms": timings}


async def _video_off_loop(holder: GalleryHolder, video_id: str) -> tuple:
    """_video on a worker thread: over a shard set the lookup asks every shard, which must not
    stall the event loop (and with it every other request)."""
    return await asyncio.get_running_loop().run_in_executor(None, _video, holder, video_id)


def _video(holder: GalleryHolder, video_id: str) -> tuple:
    gallery = holder.current().gallery
    row = gallery.row_of(video_id)
    if row is None:
        raise HTTPException(404, f"no video {video_id!r} in the gallery")
    return gallery, row


def _inside(root: str, path: str) -> str:
    """An absolute path under the media root, or 400: no absolute paths, no '..', no symlink out."""
    if not path or os.path.isabs(path) or "\x00" in path:
        raise HTTPException(400, f"path {path!r} must be relative to the gallery's media root")
    full = os.path.realpath(os.path.join(root, path))
    real_root = os.path.realpath(root)
    if full != real_root and not full.startswith(real_root + os.sep):
        raise HTTPException(400, f"path {path!r} is outside the gallery's media root")
    if not os.path.exists(full):
        raise HTTPException(404, f"no file or folder {path!r} under the media root")
    return full


def _within(root: str, path: str) -> bool:
    """Whether `path`, links resolved, is inside `root` (links resolved too)."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def _files_inside(root: str, paths: list) -> list:
    """The video files the paths name (folders walked as `cvr index` walks them), less any whose
    real location is outside the media root (a link inside pointing out)."""
    from engine.video_files import find_videos

    found, _ = find_videos(paths)
    return [p for p in found if _within(root, p)]


def _swagger_assets() -> str | None:
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return swagger_ui_bundle.swagger_ui_path


def _media_type(path: str) -> str:
    import mimetypes

    return mimetypes.guess_type(path)[0] or "application/octet-stream"


def _check_key(request: Request, key: str) -> None:
    given = request.headers.get("x-api-key") or ""
    authorization = request.headers.get("authorization") or ""
    if authorization.lower().startswith("bearer "):
        given = given or authorization[7:].strip()
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPException(401, "missing or wrong API key (header X-API-Key or Authorization: Bearer)")


class _BodyLimit:
    """Pure ASGI: a request body over MAX_BODY_BYTES is answered 413 before any route reads it
    (by its Content-Length, or while it streams in); a body under the limit is replayed whole."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await _refuse(send, 400, "Content-Length is not a number")
        if length is not None and int(length) > MAX_BODY_BYTES:
            return await _too_large(send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                return await _too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)


async def _too_large(send) -> None:
    await _refuse(send, 413, f"request body over {MAX_BODY_BYTES} bytes")


async def _refuse(send, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers=SECURITY_HEADERS)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class _Guard(BaseHTTPMiddleware):
    """Security headers on every answer, and the request counters and latency per route."""

    def __init__(self, app, metrics: Metrics):
        super().__init__(app)
        self.metrics = metrics

    async def dispatch(self, request: Request, call_next):
        route = _route_label(request)
        started = time.perf_counter()
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        return response


def _route_label(request: Request) -> str:
    """A bounded label: the route's template, not the raw path (ids would explode the metric)."""
    path = request.url.path
    for prefix, label in (("/v1/videos/", "/v1/videos/{id}"), ("/v1/jobs/", "/v1/jobs/{id}"),
                          ("/v1/anchors/", "/v1/anchors/{name}"), ("/static/", "/static"), ("/metrics", "/metrics")):
        if path.startswith(prefix):
            return label + ("/file" if path.endswith("/file") else "/thumbnail" if path.endswith("/thumbnail") else "")
    return path if path in ("/", "/healthz", "/readyz", "/v1/search", "/v1/videos", "/docs", "/openapi.json") \
        else "other"
