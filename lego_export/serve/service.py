"""Jobs, admission and slots around the batcher: what the HTTP layer (and Ray replicas) call.

A job waits in a bounded queue until one of ``max_active`` slots is free, then samples in its own
thread through the batcher, and its images are encoded (PNG grid or npz) outside the batcher
so that encoding never holds up a tick. Every way out (done, failed, cancelled, expired, shut down)
frees the slot and starts the next queued job.

Deadlines. A request's work is priced when it arrives (cost.py over plan.engine_work). Its deadline
is its ``deadline_s`` or the server's ``--slo`` (seconds, or a multiple of its own predicted time
alone). Admission simulates the live jobs in the order the batcher falls back to when arrival
order would make one late (least slack first) and takes the most expensive way of running the
request that finishes in time (with a tenth of that time to spare, cost.finish_by) without taking an
admitted job's spare time, counting the wait for a slot: the request's own options,
else the rungs of the model's quality ladder below them (unless the request pins ``"quality":
"exact"``). When none does, the request is refused at once (429 with Retry-After). A job whose
deadline passes before it finishes ends as ``expired``, never as a late success.
"""

from __future__ import annotations

import heapq
import io
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lego_export.errors import LegoError
from lego_export.manifest import Manifest
from lego_export.options import GUIDANCE_FIELDS, TRAJECTORY_FIELDS, SamplingOptions
from lego_export.plan import engine_work
from lego_export.runtime.backends import make_backend
from lego_export.runtime.pipeline import SampleResult, files_precision
from lego_export.serve.batcher import (
    BatcherConfig,
    CallBatcher,
    EngineFailed,
    RequestCancelled,
    RequestExpired,
    Slot,
)
from lego_export.serve.cost import CostModel, finish_by
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
    streams: int = 1  # requests' engine calls at once, each on a share of the threads; 0: default_streams
    max_batch_tiles: int = 0  # cap on tiles per engine call; 0: the manifest's N range
    max_active: int = 16  # requests sampling at once (their tiles share engine calls)
    order: str = "slack"  # batcher: which calls run first (batcher.ORDERS)
    slo: str = "none"  # deadline of a request without deadline_s: "none", "30s", or "5x" its predicted time
    align: bool = True  # batcher, merge order: earliest engine of the chain first, so requests fall into step
    calibrate: bool = True  # batcher: cut calls at each engine's fastest N per row, measured at startup
    max_queue: int = 64  # requests waiting for a slot; beyond that: 429
    limits: Limits = field(default_factory=Limits)
    keep_jobs: int = 256  # finished asynchronous jobs kept for GET /v1/jobs/{id}
    job_ttl_s: float = 600.0  # and for at most this long


QUEUED, RUNNING, DONE, FAILED, CANCELLED, EXPIRED = "queued", "running", "done", "failed", "cancelled", "expired"
EXPIRED_IN = ("queue", "sampling", "answer")  # where an expired job was when its deadline passed
TERMINAL = (DONE, FAILED, CANCELLED, EXPIRED)
ORDER_SLACK = 10.0  # a job without a deadline is ordered as if due in this many times its predicted time
HEADROOM = 0.8  # a job runs at full cost only if that leaves it a fifth of its time to spare...
HEADROOM_MIN = 0.3  # ...while requests are not lost; after losses, down to this (Headroom)
HEADROOM_STEP = 0.02  # per request lost
LOSS_TARGET = 0.01  # the share of requests lost at which the headroom settles
MAX_PRICES = 4096  # predictions remembered (request kinds)
FIT_REPEATS = 3  # timed runs of each case the cost model's host terms are fitted on
FIT_BUDGET_S = 5.0  # beyond this, each case is timed once (large models)
REFIT_RUNS = 32  # the latest jobs that ran alone, which the cost model's host terms are refitted on
REFIT_EVERY = 8  # refit after this many more
SCALE_WORK_S = 0.5  # the pace is updated once this much predicted work has finished (seconds)
EXPIRED_STATUS = 504


def default_streams(backend, threads: int = 0) -> int:
    """--streams 0: two on ONNX Runtime on a CPU of two or more cores, else one. On a CPU two
    requests side by side on one thread each finish sooner than the two in turn on all threads,
    while OpenVINO's throughput streams gain nothing (docs/serving.md); a GPU runs one call at a
    time."""
    cores = threads or os.cpu_count() or 1
    on_cpu = getattr(backend, "device", "cpu") == "cpu"
    return 2 if getattr(backend, "name", "") == "onnxruntime" and on_cpu and cores >= 2 else 1


def parse_slo(text: str) -> tuple[str, float] | None:
    """--slo: "none", "N" or "Ns" (seconds), or "Nx" (N times the request's predicted time alone)."""
    value = str(text).strip().lower()
    if value in ("", "none"):
        return None
    unit = "x" if value.endswith("x") else "s"
    try:
        number = float(value.rstrip("xs"))
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and 0 < number <= 86_400 and (unit == "s" or number >= 1)):
        raise LegoError(f'slo must be "none", seconds ("30s") or a multiple of at least 1 ("5x"), got {text!r}')
    return unit, number


class ServiceUnavailable(Exception):
    """The request was not admitted: queue full or no way to meet its deadline (429), or shutting
    down (503). retry_after: seconds, for the Retry-After header."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass
class Headroom:
    """The share of the time to its deadline a request may take at a rung before a cheaper one is
    taken, learnt from outcomes: each request lost (refused or expired) lowers it by HEADROOM_STEP,
    each in time raises it by a step sized so that it settles where LOSS_TARGET of the requests with
    a deadline are lost (a stochastic approximation), between HEADROOM_MIN and HEADROOM. A server
    that loses requests runs more of them at cheaper rungs, leaving room for the next."""

    share: float = HEADROOM

    def update(self, lost: bool) -> None:
        if lost:
            self.share = max(HEADROOM_MIN, self.share - HEADROOM_STEP)
        else:  # in balance when losses are LOSS_TARGET of the outcomes
            self.share = min(HEADROOM, self.share + HEADROOM_STEP * LOSS_TARGET / (1 - LOSS_TARGET))


@dataclass(frozen=True)
class Choice:
    """One way to run a request: its own options (rung None) or a rung of the ladder, and its price."""

    options: SamplingOptions
    rung: int | None = None
    predicted_s: float = 0.0  # alone on the machine; 0 without a cost model


@dataclass(eq=False)
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
    choices: list[Choice] = field(default_factory=list)  # most expensive first; [0]: as asked
    choice: Choice | None = None  # what it runs
    deadline: float | None = None  # time.monotonic() by which it must finish (None: no deadline)
    order_by: float = math.inf  # the deadline the order uses (a job without one still ages)
    steps_done: int = 0
    started: float | None = None  # when it got its slot
    alone: bool = False  # no other job ran at any time while it did (its time refits the cost model)
    expired_in: str | None = None  # where it was when its deadline passed (EXPIRED_IN)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def remaining_s(self) -> float:
        if self.slot is not None:
            return self.slot.remaining_s
        return self.choice.predicted_s if self.choice is not None else 0.0

    def urgency(self, now: float) -> tuple:
        """The batcher's order (Slot.urgency), for jobs still queued too."""
        return (-self.request.priority, self.order_by - now - self.remaining_s, self.created)

    def describe(self, position: int | None = None) -> dict:
        """The job's JSON: status, queue position, progress, what runs and where the result is."""
        info = {"id": self.id, "status": self.state, **self.request.describe()}
        if position is not None:
            info["queue_position"] = position
        if self.choice is not None:
            info["progress"] = {"steps_done": self.steps_done, "steps": self.choice.options.steps}
            info["predicted_s"] = round(self.choice.predicted_s, 4)
        if self.deadline is not None:
            info["deadline_in_s"] = round(self.deadline - time.monotonic(), 4)
        if self.run is not None:
            info["run"] = self.run
        if self.state == DONE:
            info["result"] = f"/v1/jobs/{self.id}/result"
        if self.error:
            info["error"] = self.error
        if self.expired_in:
            info["expired_in"] = self.expired_in
        return info


class ImageService:
    """One model, one real backend, one batcher, and the jobs sampling through it."""

    def __init__(self, config: ServeConfig, backend=None, manifest: Manifest | None = None):
        """backend: defaults to config.backend over config.engines (tests pass their own)."""
        folder = Path(config.engines)
        self.manifest = manifest or Manifest.read(folder)
        narrow, streams = None, config.streams
        if backend is None:
            threads, precision = config.threads, config.precision
            backend = make_backend(config.backend, folder, self.manifest, threads=threads, precision=precision)
            streams = streams or default_streams(backend, threads)
            if streams > 1:  # the same engines again, each on its share of the threads
                narrow = make_backend(
                    backend.name, folder, self.manifest, threads=threads, precision=precision, streams=streams
                )
        self.config = config = replace(config, streams=streams or 1)
        self.backend_name = getattr(backend, "name", type(backend).__name__)
        self.precision = getattr(backend, "precision", "fp32")
        self.files_precision = files_precision(self.manifest, self.backend_name, self.precision)
        self.slo = parse_slo(config.slo)
        self.batcher = CallBatcher(
            self.manifest,
            backend,
            BatcherConfig(
                max_batch_tiles=config.max_batch_tiles,
                calibrate=config.calibrate,
                order=config.order,
                align=config.align,
                streams=config.streams,
            ),
            narrow_backend=narrow,
        )
        self.cost: CostModel | None = None
        self._fit_runs: list[tuple[list[dict[str, int]], float]] = []  # startup's (work, seconds)
        self._alone_runs: deque[tuple[list[dict[str, int]], float]] = deque(maxlen=REFIT_RUNS)
        self._since_refit = 0
        if self.batcher.cost is not None:
            self.cost = self.batcher.cost = self._fit_cost(self.batcher.cost)
        self._prices: tuple[CostModel | None, dict] = (self.cost, {})  # predict's memo, for this cost model
        recommended = self.manifest.recommended
        self.ladder = recommended.rungs if recommended is not None else []
        self.metrics = ServiceMetrics()
        self._lock = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._active = 0
        self._accepting = True
        self.closed = False
        self.instance = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (replicas)
        # The pace: wall seconds the machine takes, while busy, per second of predicted work. It
        # corrects the cost model for what a run alone does not show (HTTP, contention, drift).
        self.pace = 1.0
        self._busy_s = self._pace_work = 0.0
        self.headroom = Headroom()
        self._last_event = time.monotonic()
        # Jobs sample in pooled threads: a runner keeps per-thread state (OpenVINO's infer requests),
        # which a thread per job would build again for every request.
        # The batcher runs ticks in these threads; each keeps off the engines' pinned cores (cores.py).
        self._workers = ThreadPoolExecutor(
            max_workers=config.max_active, thread_name_prefix="lego-job", initializer=self.batcher.pin_caller
        )
        self._reaper = threading.Thread(target=self._expire_loop, name="lego-deadlines", daemon=True)
        self._reaper.start()

    def _fit_cost(self, cost: CostModel) -> CostModel:
        """The host terms of the cost model, from short runs alone of the model's default setting
        through the batcher and the answer's encoding: one image and four, one image at half the
        steps, and one on a canvas twice the side (the per-tile term then is measured, not
        extrapolated to larger canvases). Each run is warmed up once, then timed up to FIT_REPEATS
        times, the median kept (one run scatters by several percent, which would go straight into
        the terms), while the fit stays within FIT_BUDGET_S."""
        options = self.manifest.recommended.options if self.manifest.recommended else SamplingOptions(steps=4)
        side = self.manifest.model.img_resolution
        half = replace(options, steps=max(1, options.steps // 2))
        cases = [(options, 1, side), (options, 4, side), (half, 1, side), (options, 1, 2 * side)]
        budget_end = time.perf_counter() + FIT_BUDGET_S
        runs = []
        for run_options, num, canvas_side in cases:
            canvas = (canvas_side, canvas_side)
            times = []
            for attempt in range(1 + FIT_REPEATS):
                if attempt > 1 and time.perf_counter() > budget_end:
                    break
                slot = self.batcher.join()
                try:
                    start = time.perf_counter()
                    result = self.batcher.pipeline(slot)(run_options, num=num, batch=num, seed=0, resolution=canvas)
                    encode(result, ImageRequest(num=num))
                    seconds = time.perf_counter() - start
                finally:
                    self.batcher.leave(slot)
                if attempt > 0:  # the first run warms up (sessions allocate at a new size)
                    times.append(seconds)
            runs.append((engine_work(run_options, self.manifest.model, canvas, num), float(np.median(times))))
        self._fit_runs = runs
        return cost.fit_host(runs)

    def _learn_locked(self, job: Job, seconds: float) -> None:
        """Refit the host terms on the latest jobs that ran alone (each REFIT_EVERY of them): the
        startup runs can be slower than the same work later, and every prediction would carry that."""
        model, request = self.manifest.model, job.request
        work = engine_work(job.choice.options, model, request.canvas(model), request.num)
        self._alone_runs.append((work, seconds))
        self._since_refit += 1
        if self._since_refit >= REFIT_EVERY:
            self._since_refit = 0
            self.cost = self.batcher.cost = self.cost.fit_host(self._fit_runs + list(self._alone_runs))

    # -- admission --------------------------------------------------------------------------------

    def parse(self, data: dict) -> ImageRequest:
        """Validate a request body (RequestError with a 4xx status on any bad field)."""
        try:
            return parse_image_request(data, self.manifest, self.config.limits)
        except RequestError:
            self.metrics.count("invalid")
            raise

    def submit(self, request: ImageRequest, received: float | None = None) -> Job:
        """Queue a validated request; ServiceUnavailable when the queue is full, its deadline cannot
        be met, or the server stops. received: time.monotonic() when the request arrived (the HTTP
        layer's first look at it); its deadline runs from then, as its client's clock does."""
        job = Job(uuid.uuid4().hex, request, choices=self.choices(request))
        own = job.choices[0].predicted_s
        with self._lock:
            if not self._accepting:
                self.metrics.count("rejected")
                raise ServiceUnavailable(503, "the server is shutting down")
            if self._active >= self.config.max_active and len(self._queue) >= self.config.max_queue:
                self.metrics.count("rejected")
                raise ServiceUnavailable(429, f"queue full ({self.config.max_queue} waiting); retry later", 1)
            now = time.monotonic()
            job.created = min(now, received) if received is not None else now
            budget = request.deadline_s
            if budget is None and self.slo is not None and (self.slo[0] == "s" or own > 0):
                budget = self.slo[1] if self.slo[0] == "s" else self.slo[1] * own
            if budget is not None:
                job.deadline = job.created + budget
            job.order_by = job.deadline if job.deadline is not None else now + ORDER_SLACK * own
            job.choice = self._choose_locked(job, now)
            if job.choice is None:
                self.metrics.count("refused")
                self.headroom.update(lost=True)
                backlog = sum(j.remaining_s for j in self._live_locked())
                raise ServiceUnavailable(
                    429,
                    f"cannot finish within its deadline of {budget:.3g} s, even at the cheapest setting it "
                    f"allows (about {backlog:.3g} s of work ahead); retry later",
                    max(1, math.ceil(backlog)),
                )
            self._evict_locked()
            self._jobs[job.id] = job
            self._queue.append(job)
            self._dispatch_locked(planned=job)
            self._lock.notify_all()  # the deadline watcher looks again
            return job

    def choices(self, request: ImageRequest) -> list[Choice]:
        """Ways to run a request, most expensive first: its own options, then (elastic quality) each
        rung of the ladder that is cheaper than the way before it, down to the lowest rung allowed."""
        own = Choice(request.options, 0 if request.recommended else None, self.predict(request, request.options))
        if request.quality == "exact" or request.options.churn is not None or self.cost is None:
            return [own]
        lowest = request.quality if isinstance(request.quality, int) else len(self.ladder) - 1  # "elastic"
        top = self.ladder[0] if self.ladder else None
        # The rungs' own guidance applies unless the request asked for guidance of its own.
        own_guidance = (request.options.guidance, request.options.guidance_interval)
        keeps_guidance = top is None or own_guidance != (top.guidance, top.guidance_interval)
        out = [own]
        for rung, setting in enumerate(self.ladder[: lowest + 1]):
            taken = TRAJECTORY_FIELDS + (() if keeps_guidance else GUIDANCE_FIELDS)  # churn: None in both
            options = replace(request.options, **{name: getattr(setting, name) for name in taken})
            predicted = self.predict(request, options)
            if predicted < 0.97 * out[-1].predicted_s:  # cheaper by a margin the cost model resolves
                out.append(Choice(options, rung, predicted))
        return out

    def predict(self, request: ImageRequest, options: SamplingOptions) -> float:
        """Seconds the request takes alone with these options (0 without a cost model)."""
        if self.cost is None:
            return 0.0
        model = self.manifest.model
        # Memoised per cost model: requests repeat a few kinds, and planning each of a request's
        # choices again would cost every admission the same work.
        if self._prices[0] is not self.cost:
            self._prices = (self.cost, {})
        prices, key = self._prices[1], (options, request.canvas(model), request.num)
        if key not in prices:
            if len(prices) >= MAX_PRICES:
                prices.clear()
            prices[key] = self.cost.seconds(engine_work(options, model, key[1], request.num))
        return prices[key]

    def _live_locked(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.state in (QUEUED, RUNNING)]

    def _finishes(self, jobs: list[Job], now: float, planned: Job) -> dict[str, float]:
        """Predicted finish time of each job, the machine running one at a time: of the jobs in a
        slot, the most urgent first (the batcher's order); a job not started takes a slot when one
        frees, the most urgent first (a short job behind max_active long ones waits for the first of
        them, which the order alone would run after it). The planned job at its current choice, the
        others that have not started at their cheapest (each is planned again when it starts, down
        to that), the running ones at what they have left."""

        def work(j: Job) -> float:
            if j is planned or j.slot is not None or not j.choices:
                return j.remaining_s
            return j.choices[-1].predicted_s

        def key(j: Job) -> tuple:
            return (-j.request.priority, j.order_by - now - work(j), j.created)

        running = [(key(j), id(j), j) for j in jobs if j.slot is not None]
        heapq.heapify(running)
        waiting = deque(sorted((key(j), id(j), j) for j in jobs if j.slot is None))
        finish, out = now, {}
        while running or waiting:
            while waiting and len(running) < self.config.max_active:
                heapq.heappush(running, waiting.popleft())
            j = heapq.heappop(running)[2]
            finish += self.pace * work(j)
            out[j.id] = finish
        return out

    def _account_locked(self, finished_work_s: float = 0.0) -> None:
        """Count busy wall time up to now, and work finished; update the pace every SCALE_WORK_S."""
        now = time.monotonic()
        if self._active > 0:
            self._busy_s += now - self._last_event
        self._last_event = now
        self._pace_work += finished_work_s
        if self._pace_work >= SCALE_WORK_S:
            measured = min(3.0, max(0.5, self._busy_s / self._pace_work))
            self.pace = self.batcher.pace = 0.7 * self.pace + 0.3 * measured
            self._busy_s = self._pace_work = 0.0

    def _choose_locked(self, job: Job, now: float) -> Choice | None:
        """How a job runs: the most expensive of its choices that finishes within the headroom's
        share of the time to its deadline (Headroom); failing that (a loaded server), the cheapest
        that finishes in time (cost.finish_by), so that the load sheds work; None if none does. A
        choice must not take an admitted job's spare time, nor make it late. A job without a
        deadline runs as asked."""
        if job.deadline is None:
            return job.choices[0]

        others = [j for j in self._live_locked() if j is not job]
        before = self._finishes(others, now, job)
        # An admitted job in time keeps its spare time, or what it has left of it.
        latest = {
            j.id: max(finish_by(j.deadline, now), before[j.id])
            for j in others
            if j.deadline is not None and before[j.id] <= j.deadline
        }
        in_time_by = finish_by(job.deadline, now)
        within_headroom_by = finish_by(job.deadline, now, self.headroom.share)
        in_time = []
        for choice in job.choices:
            job.choice = choice
            after = self._finishes([*others, job], now, job)
            if after[job.id] <= in_time_by and all(after[i] <= t for i, t in latest.items()):
                if after[job.id] <= within_headroom_by:
                    return choice
                in_time.append(choice)
        job.choice = in_time[-1] if in_time else None
        return job.choice

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def forget(self, job: Job) -> None:
        """Drop a job once its answer was delivered (synchronous requests)."""
        with self._lock:
            self._jobs.pop(job.id, None)

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Cancel a job: it says cancelled at once; a running one frees its slot at its next engine call."""
        with self._lock:
            status = 499 if self._accepting else 503
            if job.state == QUEUED:
                self._queue.remove(job)
                self._end_locked(job, CANCELLED, None, reason, status)
            elif job.state == RUNNING and job.slot is not None:
                job.state, job.error, job.status, job.finished = CANCELLED, reason, status, time.monotonic()
                self.batcher.cancel(job.slot)
                self._said_locked(job)

    def position(self, job: Job) -> int | None:
        """How many queued jobs run before this one (None once it runs)."""
        with self._lock:
            if job.state != QUEUED or job not in self._queue:  # running, ended, or another replica's
                return None
            now = time.monotonic()
            return sorted(self._queue, key=lambda j: j.urgency(now)).index(job)

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

    def run_record(self, job: Job) -> dict:
        """What makes a job's images (the answer's X-Lego-Run header and PNG text, the job JSON): the
        options that run, and the ladder rung they are (none: as asked) and whether that is degraded."""
        request, choice = job.request, job.choice
        canvas = request.canvas(self.manifest.model)
        return {
            **request.describe(),
            "options": choice.options.to_dict(),
            "rung": choice.rung,
            "degraded": choice is not job.choices[0],
            "predicted_s": round(choice.predicted_s, 4),
            "pace": round(self.pace, 4),  # when it started: the server planned with predicted_s x pace
            "quality": request.quality,
            "backend": self.backend_name,
            "precision": {"files": self.files_precision, "runtime": self.precision},
            "canvas": list(canvas),
            "images": request.num,
            "checkpoint_sha256": self.manifest.source["sha256"],
        }

    # -- running ----------------------------------------------------------------------------------

    def _dispatch_locked(self, planned: Job | None = None) -> None:
        """Start the most urgent queued jobs while slots are free; each takes the best choice that
        still meets its deadline now (the queue may have drained since it arrived), except the job
        admission planned just now (planned)."""
        while self._queue and self._active < self.config.max_active:
            now = time.monotonic()
            job = min(self._queue, key=lambda j: j.urgency(now))
            self._queue.remove(job)
            if job is not planned:
                job.choice = self._choose_locked(job, now) or job.choices[-1]
            job.run = self.run_record(job)
            choice = job.choice
            try:
                slot = self.batcher.join(
                    work_s=choice.predicted_s,
                    deadline=job.order_by,
                    priority=job.request.priority,
                )
            except RequestCancelled:
                self._end_locked(job, CANCELLED, None, "the server is shutting down", 503)
                continue
            self._account_locked()  # busy time is counted from here when the machine was idle
            job.slot, job.state, job.started = slot, RUNNING, time.monotonic()
            self.metrics.count_rung(choice.rung)
            job.alone = self._active == 0
            if not job.alone:
                for other in self._live_locked():
                    other.alone = False
            self._active += 1
            self._workers.submit(self._work, job, slot)

    def _work(self, job: Job, slot: Slot) -> None:
        """Sample one job through the batcher, then encode its answer."""
        result, state, error, status, where = None, DONE, None, 200, None

        def progress(step: int) -> None:
            job.steps_done = step + 1

        try:
            kwargs = {**job.request.pipe_kwargs(), "options": job.choice.options}
            result = self.batcher.pipeline(slot)(**kwargs, progress=progress)
        except RequestExpired:
            state, status, where = EXPIRED, EXPIRED_STATUS, "sampling"
            error = f"deadline passed after {job.steps_done} of {job.choice.options.steps} steps"
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
        if state == DONE and job.choice.options.caches:  # the gate decided at run time: what actually ran
            job.run["full_chain_evaluations"] = round(result.timing.full_chain_evaluations, 4)
        if state == DONE:
            try:
                body = encode(result, job.request, job.run)
            except Exception as e:  # noqa: BLE001
                log.exception("request %s: encoding failed", job.id)
                state, error, status = FAILED, f"encoding failed: {type(e).__name__}", 500
        # Judged once the answer is ready to go (encoding counts), never as a late success.
        if state == DONE and job.deadline is not None and time.monotonic() > job.deadline:
            state, status, body, where = EXPIRED, EXPIRED_STATUS, None, "answer"
            error = f"finished {time.monotonic() - job.deadline:.3g} s after its deadline"

        if log.isEnabledFor(logging.DEBUG):  # why a job was late, for whoever reads --log-level debug
            end = time.monotonic()
            left = "no deadline" if job.deadline is None else f"{job.deadline - end:+.3f} s to its deadline"
            log.debug(
                "job %s %s: rung %s, predicted %.3f s x pace %.2f, queued %.3f s, in its slot %.3f s, %s",
                job.id, state, job.choice.rung, job.choice.predicted_s, job.run["pace"], job.started - job.created,
                end - job.started, left,
            )  # fmt: skip
        with self._lock:
            self._account_locked(slot.done_s)
            self._active -= 1
            if state == DONE and job.alone and self.cost is not None:  # before its answer goes out
                self._learn_locked(job, time.monotonic() - job.started)
            self._end_locked(job, state, body, error, status, where)
            self._dispatch_locked()

    def _end_locked(
        self, job: Job, state: str, body: bytes | None, error: str | None, status: int, where: str | None = None
    ) -> None:
        """A job ends (where: for an expired one, EXPIRED_IN's word for where its deadline passed)."""
        if job.state == CANCELLED and job.finished is not None:  # said so when it was cancelled
            state, body, error, status = CANCELLED, None, job.error, job.status
        job.state, job.body, job.error, job.status = state, body, error, status
        job.expired_in = where if state == EXPIRED else None
        job.finished = time.monotonic()
        job.slot = None
        if job.deadline is not None and state in (DONE, EXPIRED):  # DONE with a deadline: in time
            self.headroom.update(lost=state == EXPIRED)
        if state == DONE:
            self.metrics.finished(job.request.num, job.finished - job.created)
        else:
            self.metrics.count(state)
        job.future.set_result(job)
        self._said_locked(job)
        self._lock.notify_all()

    def _said_locked(self, job: Job) -> None:
        """What a job says of itself changed: it ended, or says cancelled while its call runs on.
        Nothing to do here; replicas that share jobs (ray_app) publish it."""

    def _evict_locked(self) -> None:
        """Bound the finished jobs kept: the oldest go first, and any past their time to live."""
        now = time.monotonic()
        finished = [j for j in self._jobs.values() if j.terminal]
        excess = len(finished) - self.config.keep_jobs
        for j in finished:
            if excess > 0 or now - j.finished > self.config.job_ttl_s:
                self._jobs.pop(j.id, None)
                excess -= 1

    def _expire_loop(self) -> None:
        """End jobs whose deadline passed: queued ones at once, running ones at their next engine call."""
        with self._lock:
            while not self.closed:
                now = time.monotonic()
                for job in [j for j in self._queue if j.deadline is not None and j.deadline < now]:
                    self._queue.remove(job)
                    self._end_locked(job, EXPIRED, None, "deadline passed while queued", EXPIRED_STATUS, "queue")
                for job in self._live_locked():
                    slot = job.slot
                    if (
                        job.state == RUNNING
                        and job.deadline is not None
                        and job.deadline < now
                        and slot
                        and not slot.expired
                    ):
                        self.batcher.expire(slot)
                upcoming = [j.deadline for j in self._live_locked() if j.deadline is not None and j.deadline >= now]
                self._lock.wait(timeout=min([1.0, *(d - now + 1e-3 for d in upcoming)]))

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
            self._lock.notify_all()  # the deadline watcher ends
        self._workers.shutdown(wait=False)
        self.batcher.close()


def encode(result: SampleResult, request: ImageRequest, record: dict | None = None) -> bytes:
    """The answer's bytes: a PNG grid (with the run record as text), or an npz of float32 images in
    [-1, 1] (and labels)."""
    buffer = io.BytesIO()
    if request.format == "npz":
        if result.labels is None:
            np.savez(buffer, images=result.images)
        else:
            np.savez(buffer, images=result.images, labels=result.labels)
        return buffer.getvalue()
    from PIL import Image, PngImagePlugin

    from lego_export.images import make_grid, run_text

    grid = make_grid(result.images, columns=min(request.columns, len(result.images)))
    info = PngImagePlugin.PngInfo()
    for key, value in (run_text(record) if record is not None else {}).items():
        info.add_text(key, value)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
