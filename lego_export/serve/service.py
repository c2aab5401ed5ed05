"""Jobs, admission and slots around the batcher: what the HTTP layer (and Ray replicas) call.

A job waits in a bounded queue until one of ``max_active`` slots is free, then samples in its own
thread through the batcher, and its images are encoded (PNG grid or npz) outside the batcher
so that encoding never holds up a tick. Every way out (done, failed, cancelled, shut down) frees
the slot and starts the next queued job.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lego_export.errors import LegoError
from lego_export.manifest import Manifest
from lego_export.runtime.backends import make_backend
from lego_export.runtime.pipeline import SampleResult, files_precision
from lego_export.serve.batcher import BatcherConfig, CallBatcher, EngineFailed, RequestCancelled, Slot
from lego_export.serve.metrics import ServiceMetrics, render
from lego_export.serve.validation import ImageRequest, Limits, RequestError, parse_image_request

log = logging.getLogger("lego_serve")


@dataclass
class ServeConfig:
    """Everything one server process needs (lego-serve's options)."""

    engines: str = "engines"
    backend: str = "auto"  # as lego-run: TensorRT plans where usable, else OpenVINO on a CPU, else ONNX Runtime
    precision: str = "fp32"  # what the bricks compute in (backends.COMPUTE_PRECISIONS)
    threads: int = 0  # ONNX Runtime / OpenVINO threads; 0: all cores
    max_batch_tiles: int = 0  # cap on tiles per engine call; 0: the manifest's N range
    max_active: int = 16  # requests sampling at once (their tiles share engine calls)
    align: bool = True  # batcher: earliest engine of the chain first, so requests fall into step
    calibrate: bool = True  # batcher: cut calls at each engine's fastest N per row, measured at startup
    max_queue: int = 64  # requests waiting for a slot; beyond that: 429
    limits: Limits = field(default_factory=Limits)
    keep_jobs: int = 256  # finished asynchronous jobs kept for GET /v1/jobs/{id}
    job_ttl_s: float = 600.0  # and for at most this long


QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class ServiceUnavailable(Exception):
    """The request was not admitted: queue full (429) or shutting down (503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Job:
    id: str
    request: ImageRequest
    created: float = field(default_factory=time.monotonic)
    state: str = QUEUED
    slot: Slot | None = None
    body: bytes | None = None
    error: str | None = None
    status: int = 200  # HTTP status of the outcome
    finished: float | None = None
    future: Future = field(default_factory=Future)  # resolves to the job itself when it ends
    run: dict | None = None  # what makes its images (ImageService.run_record)

    @property
    def terminal(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    def describe(self) -> dict:
        info = {"id": self.id, "status": self.state, **self.request.describe()}
        if self.error:
            info["error"] = self.error
        return info


class ImageService:
    """One model, one real backend, one batcher, and the jobs sampling through it."""

    def __init__(self, config: ServeConfig, backend=None, manifest: Manifest | None = None):
        """backend: defaults to config.backend over config.engines (tests pass their own)."""
        self.config = config
        folder = Path(config.engines)
        self.manifest = manifest or Manifest.read(folder)
        if backend is None:
            backend = make_backend(
                config.backend, folder, self.manifest, threads=config.threads, precision=config.precision
            )
        self.backend_name = getattr(backend, "name", type(backend).__name__)
        self.precision = getattr(backend, "precision", "fp32")
        self.files_precision = files_precision(self.manifest, self.backend_name, self.precision)
        self.batcher = CallBatcher(
            self.manifest,
            backend,
            BatcherConfig(max_batch_tiles=config.max_batch_tiles, calibrate=config.calibrate, align=config.align),
        )
        self.metrics = ServiceMetrics()
        self._lock = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._active = 0
        self._accepting = True
        self.closed = False
        self.instance = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (replicas)

    # -- admission --------------------------------------------------------------------------------

    def parse(self, data: dict) -> ImageRequest:
        """Validate a request body (RequestError with a 4xx status on any bad field)."""
        try:
            return parse_image_request(data, self.manifest, self.config.limits)
        except RequestError:
            self.metrics.count("invalid")
            raise

    def submit(self, request: ImageRequest) -> Job:
        """Queue a validated request; ServiceUnavailable when the queue is full or the server stops."""
        with self._lock:
            if not self._accepting:
                self.metrics.count("rejected")
                raise ServiceUnavailable(503, "the server is shutting down")
            if self._active >= self.config.max_active and len(self._queue) >= self.config.max_queue:
                self.metrics.count("rejected")
                raise ServiceUnavailable(429, f"queue full ({self.config.max_queue} waiting); retry later")
            self._evict_locked()
            job = Job(uuid.uuid4().hex, request, run=self.run_record(request))
            self._jobs[job.id] = job
            self._queue.append(job)
            self._dispatch_locked()
            return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def forget(self, job: Job) -> None:
        """Drop a job once its answer was delivered (synchronous requests)."""
        with self._lock:
            self._jobs.pop(job.id, None)

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Cancel a job: a queued one ends at once, a running one at its next engine call."""
        with self._lock:
            if job.state == QUEUED:
                self._queue.remove(job)
                self._end_locked(job, CANCELLED, None, reason, 499)
            elif job.state == RUNNING and job.slot is not None:
                job.error = reason
                self.batcher.cancel(job.slot)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._active

    @property
    def accepting(self) -> bool:
        return self._accepting

    def metrics_text(self) -> str:
        return render(self.metrics, self.batcher.stats, self.queued, self.in_flight, self.batcher.chunks)

    def describe_config(self) -> dict:
        """The settings this process serves with (GET /healthz shows them)."""
        return {**asdict(self.config), "backend": self.backend_name, "precision": self.precision}

    def run_record(self, request: ImageRequest) -> dict:
        """What makes a request's images (the answer's X-Lego-Run header and PNG text, the job JSON)."""
        canvas = request.resolution or (self.manifest.model.img_resolution,) * 2
        return {
            **request.describe(),
            "backend": self.backend_name,
            "precision": {"files": self.files_precision, "runtime": self.precision},
            "canvas": list(canvas),
            "images": request.num,
            "checkpoint_sha256": self.manifest.source["sha256"],
        }

    # -- running ----------------------------------------------------------------------------------

    def _dispatch_locked(self) -> None:
        while self._queue and self._active < self.config.max_active:
            job = self._queue.popleft()
            try:
                slot = self.batcher.join()
            except RequestCancelled:
                self._end_locked(job, CANCELLED, None, "the server is shutting down", 503)
                continue
            job.slot, job.state = slot, RUNNING
            self._active += 1
            threading.Thread(target=self._work, args=(job, slot), name=f"lego-job-{job.id[:8]}", daemon=True).start()

    def _work(self, job: Job, slot: Slot) -> None:
        """Sample one job through the batcher, then encode its answer."""
        result, state, error, status = None, DONE, None, 200
        try:
            result = self.batcher.pipeline(slot)(**job.request.pipe_kwargs())
        except RequestCancelled:
            state, error, status = CANCELLED, job.error or "cancelled", 503 if not self._accepting else 499
        except EngineFailed as e:
            state, error, status = FAILED, str(e), 500
        except LegoError as e:  # e.g. NaN in an engine output
            state, error, status = FAILED, str(e), 500
        except Exception as e:  # noqa: BLE001 - a bug must fail this request, not the server
            log.exception("request %s failed", job.id)
            state, error, status = FAILED, f"internal error: {type(e).__name__}", 500
        finally:
            self.batcher.leave(slot)
        body = None
        if state == DONE:
            try:
                body = encode(result, job.request, job.run)
            except Exception as e:  # noqa: BLE001
                log.exception("request %s: encoding failed", job.id)
                state, error, status = FAILED, f"encoding failed: {type(e).__name__}", 500
        with self._lock:
            self._active -= 1
            self._end_locked(job, state, body, error, status)
            self._dispatch_locked()

    def _end_locked(self, job: Job, state: str, body: bytes | None, error: str | None, status: int) -> None:
        job.state, job.body, job.error, job.status = state, body, error, status
        job.finished = time.monotonic()
        job.slot = None
        if state == DONE:
            self.metrics.finished(job.request.num, job.finished - job.created)
        else:
            self.metrics.count(state)
        job.future.set_result(job)
        self._lock.notify_all()

    def _evict_locked(self) -> None:
        """Bound the finished jobs kept: the oldest go first, and any past their time to live."""
        now = time.monotonic()
        finished = [j for j in self._jobs.values() if j.terminal]
        excess = len(finished) - self.config.keep_jobs
        for j in finished:
            if excess > 0 or now - j.finished > self.config.job_ttl_s:
                self._jobs.pop(j.id, None)
                excess -= 1

    # -- shutdown ---------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running jobs finish for up to timeout seconds, cancel the rest
        (queued jobs at once), and stop the batcher. Returns within about timeout + 5 seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._accepting = False
            while self._queue:
                self._end_locked(self._queue.popleft(), CANCELLED, None, "the server is shutting down", 503)
            self._lock.wait_for(lambda: self._active == 0, timeout=max(0.0, deadline - time.monotonic()))
            running = [j for j in self._jobs.values() if j.state == RUNNING]
        for job in running:
            self.cancel(job, "the server is shutting down")
        with self._lock:
            self._lock.wait_for(lambda: self._active == 0, timeout=5.0)
        self.batcher.close()


def encode(result: SampleResult, request: ImageRequest, record: dict | None = None) -> bytes:
    """The answer's bytes: a PNG grid (with the run record as text), or an npz of float32 images in
    [-1, 1] (and labels)."""
    buffer = io.BytesIO()
    if request.format == "npz":
        arrays = {"images": result.images}
        if result.labels is not None:
            arrays["labels"] = result.labels
        np.savez(buffer, **arrays)
        return buffer.getvalue()
    from PIL import Image, PngImagePlugin

    from lego_export.images import make_grid, run_text

    grid = make_grid(result.images, columns=min(request.columns, len(result.images)))
    info = PngImagePlugin.PngInfo()
    for key, value in (run_text(record) if record is not None else {}).items():
        info.add_text(key, value)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
