"""The HTTP API of lego-serve (FastAPI), over one :class:`ImageService`: POST /v1/images (answered at once,
as a job or as a stream of its events), a job's status, result, events and DELETE under /v1/jobs/{id},
POST /v1/plan (nothing runs), GET /v1/model, the playground page at /, /healthz, /metrics, and the
OpenAPI document at /openapi.json with its page at /docs.

Every error is one line of JSON, ``{"error": "..."}``, with a 4xx or 5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lego_export.flops import model_brick_flops
from lego_export.ladder import full_chain_evaluations
from lego_export.plan import describe_saving, flop_fraction_saved, plan
from lego_export.serve.config import ServeConfig
from lego_export.serve.jobs import CANCELLED, DONE, EXPIRED, FAILED, Job
from lego_export.serve.service import ImageService
from lego_export.serve.validation import MAX_BODY_BYTES, ImageRequest, RequestError, parse_body, request_schema

DISCONNECT_POLL_S = 0.1  # how often a waiting request checks that its client is still there
EVENTS = "text/event-stream"
EVENTS_POLL_S = 0.05  # how often an event stream looks for progress
MAX_EVENTS_S = 3600.0  # an event stream ends after this long whatever the job does

ERROR = {"description": "one line of JSON naming the problem", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}  # fmt: skip
OBJECT = {"application/json": {"schema": {"type": "object"}}}
PLAN = {"description": "per step: the bricks that run, cached and guided; brick runs, guided steps, FLOPs saved",
        "content": OBJECT}  # fmt: skip
JOB = {"description": "the job's JSON (status, queue_position, progress, run, result, error)", "content": OBJECT}
IMAGES = {"description": "the images: a PNG grid, or an npz (format); with stream, the job's events",
          "content": {"image/png": {}, "application/octet-stream": {}, "text/event-stream": {}}}  # fmt: skip


def error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(
    service: ImageService | Callable[[], ImageService],
    on_shutdown: Callable[[], None] | None = None,
    config: ServeConfig | None = None,
) -> FastAPI:
    """The FastAPI app. service: the service, or a callable returning it (looked up per request, so
    a Ray replica can build its service after the app exists; config then gives its settings).
    on_shutdown runs (in a worker thread) when the server stops. config.docs: serve /openapi.json
    and its page at /docs; config.ui: serve the playground page at /."""
    current = service if callable(service) and not isinstance(service, ImageService) else lambda: service
    known = service if isinstance(service, ImageService) else None
    config = known.config if known is not None else config or ServeConfig()
    schema = request_schema(config.limits, known.manifest if known is not None else None)
    body = {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(
        title="lego-serve",
        summary="LEGO brick engines over HTTP: deadlines, least-slack-first order, a quality ladder under load",
        docs_url=None,  # FastAPI's Swagger UI loads its scripts from a CDN: /docs is our own page (below)
        redoc_url=None,
        openapi_url="/openapi.json" if config.docs else None,
        lifespan=lifespan,
    )

    @app.exception_handler(RequestError)  # ServiceUnavailable too
    async def refused(_request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message, exc.retry_after)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}")

    def find(job_id: str) -> Job:
        job = current().get(job_id)
        if job is None:
            raise RequestError(404, f"no job {job_id!r} (unknown, or its result has expired)")
        return job

    @app.post(
        "/v1/images",
        openapi_extra=body,
        responses={200: IMAGES, 202: JOB, **dict.fromkeys((400, 413, 429, 500, 503, 504), ERROR)},
    )
    async def images(request: Request) -> Response:
        """Sample images; with "async": true, a job to poll, stream or fetch."""
        received = time.monotonic()  # its deadline runs from here: reading and checking the body count
        svc = current()
        req = await read_request(svc, request)
        job = svc.submit(req, received)
        location = {"Location": f"/v1/jobs/{job.id}"}
        if req.is_async:
            return JSONResponse(job.describe(svc.position(job)), status_code=202, headers=location)
        if req.stream:  # the job's events; a client that leaves before the end cancels it
            return StreamingResponse(events(svc, job, cancel_on_exit=True), media_type=EVENTS, headers=location)
        try:
            await wait_or_disconnect(job, request)
        finally:
            if not job.terminal:  # client gone (or the handler cancelled at shutdown): free the slot
                svc.cancel(job, "the client disconnected")
            svc.forget(job)
        return job_response(job)

    @app.get("/v1/jobs/{job_id}", responses={200: JOB, 404: ERROR})
    async def job_status(job_id: str) -> Response:
        """A job's status as JSON, always."""
        job = find(job_id)
        return JSONResponse(job.describe(current().position(job)))

    @app.get("/v1/jobs/{job_id}/result", responses=dict.fromkeys((404, 409, 410, 500, 503, 504), ERROR))
    async def job_result(job_id: str) -> Response:
        """A finished job's image bytes (or its error)."""
        job = find(job_id)
        if not job.terminal:
            return error(409, f"job {job_id} is {job.state}, not done: GET /v1/jobs/{job_id} for its progress")
        return job_response(job)

    @app.get("/v1/jobs/{job_id}/events", responses={404: ERROR})
    async def job_events(job_id: str) -> Response:
        """Server-sent events: the job's JSON on every change, until it ends."""
        return StreamingResponse(events(current(), find(job_id)), media_type=EVENTS)

    @app.delete("/v1/jobs/{job_id}", responses={200: JOB, 404: ERROR})
    async def cancel_job(job_id: str) -> Response:
        """Cancel a job (or drop a finished one's result)."""
        svc, job = current(), find(job_id)
        if job.terminal:
            svc.forget(job)
        else:
            svc.cancel(job, "cancelled by the client")
        return JSONResponse({"id": job.id, "status": job.state})

    @app.post("/v1/plan", openapi_extra=body, responses={200: PLAN, **dict.fromkeys((400, 413), ERROR)})
    async def plan_request(request: Request) -> Response:
        """The brick plan of a request (the JSON of POST /v1/images), refused as generation refuses it; runs nothing."""
        svc = current()
        return JSONResponse(describe_plan(svc, await read_request(svc, request)))

    @app.get("/v1/model")
    async def model_info() -> Response:
        """The model and what a request may ask of it: classes, canvas, limits, the quality ladder."""
        return JSONResponse(describe_model(current()))

    if config.ui:
        from lego_export.serve.ui import CONTENT_SECURITY_POLICY, page_files

        headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}
        for path, (content, media_type) in page_files().items():
            app.add_api_route(path, static_page(content, media_type, headers), methods=["GET"], include_in_schema=False)

    if config.docs:
        from lego_export.serve.docs_page import CONTENT_SECURITY_POLICY as DOCS_POLICY
        from lego_export.serve.docs_page import docs_html

        @app.get("/docs", include_in_schema=False)
        async def docs_page() -> Response:
            page = docs_html(app.openapi())  # the same document as /openapi.json
            return Response(page, media_type="text/html", headers={"Content-Security-Policy": DOCS_POLICY})

    @app.get("/healthz")
    async def healthz() -> Response:
        svc = current()
        info = {
            "status": "ok" if svc.accepting else "shutting down",
            "model": svc.manifest.model.name,
            "backend": svc.backend.name,
            "backend_choice": svc.backend.choice,  # how --backend auto chose it, or "asked for by name"
            "in_flight": svc.in_flight,
            "queued": svc.queued,
            "pace": round(svc.pace.value, 4),  # wall seconds per predicted second of work, while busy
            "instance": svc.instance,
            "config": svc.describe_config(),
        }
        return JSONResponse(info, status_code=200 if svc.accepting else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(current().metrics_text(), media_type="text/plain; version=0.0.4")

    return app


async def read_request(svc: ImageService, request: Request) -> ImageRequest:
    """The request a body asks for, checked; a body over MAX_BODY_BYTES is refused unread when its
    Content-Length says so, else as soon as it grows past."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            break  # parse_body refuses it
    return svc.parse(parse_body(body))


async def wait_or_disconnect(job: Job, request: Request) -> None:
    """Wait for the job; return early if the client goes away (the caller then cancels it)."""
    done = asyncio.wrap_future(job.future)
    while True:
        finished, _ = await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
        if finished or await request.is_disconnected():
            return


async def events(svc: ImageService, job: Job, cancel_on_exit: bool = False):
    """Server-sent events: the job's JSON whenever its status, queue position or progress changes,
    the last one when it ends. cancel_on_exit: cancel the job if the stream stops first (its client left)."""
    last, loop = None, asyncio.get_running_loop()
    deadline = loop.time() + MAX_EVENTS_S
    try:
        while loop.time() < deadline:
            info = job.describe(svc.position(job))
            info.pop("deadline_in_s", None)  # changes all the time; not an event
            if info != last:
                yield f"event: {job.state}\ndata: {json.dumps(info, sort_keys=True)}\n\n"
                last = info
            if job.terminal:
                return
            await asyncio.sleep(EVENTS_POLL_S)
    finally:
        if cancel_on_exit and not job.terminal:
            svc.cancel(job, "the client disconnected")


def job_response(job: Job) -> Response:
    """A finished job as HTTP: its bytes, or its error."""
    if job.state == DONE:
        headers = {"X-Lego-Run": json.dumps(job.run, sort_keys=True)} if job.run else {}
        if job.started is not None and job.finished is not None:  # where its time went, in the server
            timing = {
                "queued_s": round(job.started - job.created, 6),
                "service_s": round(job.finished - job.started, 6),
            }
            headers["X-Lego-Timing"] = json.dumps(timing)
        return Response(job.body, media_type=job.request.media_type, headers=headers)
    if job.state in (FAILED, EXPIRED):
        where = {"expired_in": job.expired_in} if job.expired_in else {}
        return JSONResponse({"error": job.error, "id": job.id, "status": job.state, **where}, status_code=job.status)
    # Cancelled: by the server at shutdown (503, worth retrying elsewhere) or by a client (410).
    status = 503 if job.status == 503 else 410
    return JSONResponse({"error": job.error or "cancelled", "id": job.id, "status": CANCELLED}, status_code=status)


def static_page(content: bytes, media_type: str, headers: dict[str, str]) -> Callable:
    """A GET handler answering one file of the page."""

    async def page() -> Response:
        return Response(content, media_type=media_type, headers=headers)

    return page


def describe_plan(svc: ImageService, req: ImageRequest) -> dict:
    """What a request would run, without running it: per step the bricks that run, those that take
    their cache and whether it is guided; in all, brick runs and the share of brick FLOPs saved."""
    model = svc.manifest.model
    canvas = req.canvas(model)
    steps = plan(req.options, model, canvas, req.seed)
    bricks = len(model.bricks)
    saved = flop_fraction_saved(steps, model_brick_flops(model))
    rows: list[dict[str, Any]] = [
        {"step": p.step, "sigma": round(p.sigma, 6), "runs": [k for k in range(bricks) if p.runs(k)],
         "cached": list(p.cached), "guided": p.guided, "halves": p.halves}
        for p in steps
    ]  # fmt: skip
    predicted = svc.predict(req, req.options)
    return {
        "options": req.options.to_dict(),
        "description": req.options.describe(),
        "recommended": req.recommended,
        "quality": req.quality,
        "canvas": list(canvas),
        "images": req.num,
        "bricks": [{"name": f"brick{k}", "size": b.size} for k, b in enumerate(model.bricks)],
        "steps": rows,
        "brick_runs": sum(len(r["runs"]) for r in rows),
        "brick_runs_full": len(rows) * bricks,
        "guided_steps": sum(p.guided for p in steps),
        "flops_saved": round(saved, 6),
        "saving": describe_saving(saved),
        "predicted_s": round(predicted, 4) if predicted else None,  # alone on the machine; None: no cost model
    }


def describe_model(svc: ImageService) -> dict:
    """The model and the choices it offers: classes, canvas, this server's limits, the rungs of its
    quality ladder (0: the recommended setting, or the model's default) and its named points."""
    manifest, model, ladder = svc.manifest, svc.manifest.model, svc.ladder
    recommended = manifest.recommended
    side = model.img_resolution
    one = ImageRequest(num=1, resolution=(side, side))  # a rung's predicted time: one image, training canvas

    def setting(options, measured: dict) -> dict:
        return {"options": options.to_dict(), "description": options.describe(), "measured": measured}

    rungs = []
    for i, options in enumerate(ladder.rungs):
        predicted = svc.predict(one, options)
        rungs.append({
            **setting(options, ladder.measured[i] if i < len(ladder.measured) else {}),
            "tuned": ladder.tuned,
            "full_chain_evaluations": round(full_chain_evaluations(options, model), 4),
            "predicted_s": round(predicted, 4) if predicted else None,
        })  # fmt: skip
    points = {}
    if recommended is not None:
        points = {name: setting(r.options, r.measured) for name, r in recommended.points.items()}
    return {
        "name": model.name,
        "num_classes": model.num_classes,
        "class_names": list(manifest.class_names or []),
        "resolution": [side, side],
        "canvas_multiple": model.canvas_multiple,
        "bricks": [b.size for b in model.bricks],
        "limits": asdict(svc.config.limits),
        "recommended": rungs[0] if recommended is not None else None,
        "ladder": rungs,
        "points": points,
        "backend": svc.backend.name,
    }
