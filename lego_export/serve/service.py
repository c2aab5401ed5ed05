"""The service: wires the job store, the policy, the cost model and the batcher for the HTTP layer.

A request is priced when it arrives (cost.py over plan.engine_work), gets its deadline (its
``deadline_s``, or ``--slo``), and is admitted by the policy (policy.choose) at its own options or a
cheaper rung of the model's quality ladder (ladder.py; not with ``"quality": "exact"``), or refused
at once. It waits for one of ``max_active`` slots, is planned again when it starts (the queue may
have drained), samples in a pooled thread through the batcher, and is encoded outside the batcher.
Every way out (done, failed, cancelled, expired, shut down) frees its slot and starts the next.
"""

from __future__ import annotations

import io
import logging
import math
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from lego_export.errors import LegoError
from lego_export.ladder import serving_ladder
from lego_export.manifest import Manifest
from lego_export.options import GUIDANCE_FIELDS, TRAJECTORY_FIELDS, SamplingOptions
from lego_export.plan import engine_work
from lego_export.runtime.backends import make_backend
from lego_export.runtime.pipeline import SampleResult, files_precision
from lego_export.serve.batcher import CallBatcher, EngineFailed, RequestCancelled, RequestExpired, Slot
from lego_export.serve.config import ServeConfig, parse_slo
from lego_export.serve.jobs import CANCELLED, DONE, EXPIRED, FAILED, QUEUED, RUNNING, Job, JobStore
from lego_export.serve.metrics import ServiceMetrics, render
from lego_export.serve.policy import SPARE, Choice, Pace, Work, choose, urgency
from lego_export.serve.validation import ImageRequest, RequestError, parse_image_request

log = logging.getLogger("lego_serve")

ORDER_SLACK = 10.0  # a job without a deadline is ordered as if due in this many times its predicted time
FIT_REPEATS = 3  # timed runs of each case the cost model's host terms are fitted on
FIT_BUDGET_S = 5.0  # beyond this, each case is timed once (large models)
CHEAPER = 0.97  # a rung is a choice only if it is cheaper than the one above by a margin the cost model resolves
EXPIRED_STATUS = 504
CLOSE_GRACE_S = 2.0  # after the drain, cancelled jobs stop within one engine chunk; waited for this long


class ServiceUnavailable(RequestError):
    """The request was not admitted: queue full or no way to meet its deadline (429), or shutting down (503)."""


def default_streams(backend, threads: int = 0) -> int:
    """--streams 0: two on ONNX Runtime on a CPU of two or more cores, else one."""
    cores = threads or os.cpu_count() or 1
    return 2 if backend.name == "onnxruntime" and backend.device == "cpu" and cores >= 2 else 1


class ImageService:
    """One model, one real backend, one batcher, and the jobs sampling through it."""

    def __init__(
        self, config: ServeConfig, backend=None, manifest: Manifest | None = None, store: JobStore | None = None
    ):
        """backend: defaults to config.backend over config.engines (tests pass their own); store: where
        jobs are kept (replicas pass one they share)."""
        config.check()
        folder = Path(config.engines)
        self.manifest = manifest or Manifest.read(folder)
        narrow, streams = None, config.streams
        if backend is None:
            threads, precision = config.threads, config.precision
            backend = make_backend(
                config.backend, folder, self.manifest, ckpt=config.ckpt, threads=threads, precision=precision
            )
            streams = streams or default_streams(backend, threads)
            if streams > 1:  # the same engines again, each on its share of the threads
                narrow = make_backend(
                    backend.name, folder, self.manifest, threads=threads, precision=precision, streams=streams
                )
        self.config = config = replace(config, streams=streams or 1)
        self.backend = backend
        self.files_precision = files_precision(self.manifest, backend.name, backend.precision)
        self.slo = parse_slo(config.slo)
        self.pace = Pace()
        self.batcher = CallBatcher(self.manifest, backend, config, self.pace, narrow_backend=narrow)
        self.prices = self.batcher.prices
        if self.prices.model is not None:
            self.prices.model = self.prices.model.fit_host(self._startup_runs())
        self.ladder = serving_ladder(self.manifest)
        self.metrics = ServiceMetrics()
        self.lock = threading.Condition()
        self.store = store or JobStore(config.keep_jobs, config.job_ttl_s)
        self._active = 0
        self._accepting = True
        self.closed = False
        self.instance = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (replicas)
        # Jobs sample in pooled threads: a runner keeps per-thread state (OpenVINO's infer requests),
        # which a thread per job would build again for every request.
        self._workers = ThreadPoolExecutor(max_workers=config.max_active, thread_name_prefix="lego-job")
        self._last_event = time.monotonic()
        self._reaper = threading.Thread(target=self._expire_loop, name="lego-deadlines", daemon=True)
        self._reaper.start()

    def _startup_runs(self) -> list[tuple[list[dict[str, int]], float]]:
        """Runs alone through the batcher and the answer's encoding, to fit the host terms on: the
        ladder's top setting for one image and four, at half the steps, and on a canvas twice the
        side (the per-tile term then is measured, not extrapolated). Each warmed up once, then timed
        up to FIT_REPEATS times, the median kept (one run scatters by several percent), within
        FIT_BUDGET_S."""
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
        return runs

    # -- admission --------------------------------------------------------------------------------

    def parse(self, data: dict) -> ImageRequest:
        """Validate a request body (RequestError with a 4xx status on any bad field)."""
        try:
            return parse_image_request(data, self.manifest, self.config.limits, rungs=len(self.ladder.rungs))
        except RequestError:
            self.metrics.count("invalid")
            raise

    def submit(self, request: ImageRequest, received: float | None = None) -> Job:
        """Queue a validated request; ServiceUnavailable when the queue is full, its deadline cannot
        be met, or the server stops. received: time.monotonic() when the request arrived (the HTTP
        layer's first look at it); its deadline runs from then, as its client's clock does."""
        job = Job(uuid.uuid4().hex, request, choices=self.choices(request))
        own = job.choices[0].predicted_s
        with self.lock:
            if not self._accepting:
                self.metrics.count("rejected")
                raise ServiceUnavailable(503, "the server is shutting down")
            if self._active >= self.config.max_active and len(self.store.queue) >= self.config.max_queue:
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
                raise self._refusal(job, budget, now)
            self.store.add(job)
            self._dispatch_locked(planned=job)
            self.lock.notify_all()  # the deadline watcher looks again
        return self.store.settled(job.id, job)  # a shared store: every replica finds it from now on

    def _refusal(self, job: Job, budget: float, now: float) -> ServiceUnavailable:
        """429 for a job no choice fits: worth retrying when the work ahead is what stands in the way;
        when the request alone would not make it, a message that names the deadline it needs."""
        cheapest = job.choices[-1]
        pace = self.pace.value
        alone = choose(replace(job.work(), seconds=cheapest.predicted_s), [cheapest], [], now, pace, 1, headroom=1.0)
        if alone is None:
            needed = math.ceil(100 * pace * cheapest.predicted_s / SPARE) / 100
            return ServiceUnavailable(
                429,
                f"cannot finish within its deadline of {budget:.3g} s even alone on this server: its cheapest "
                f"allowed setting takes about {pace * cheapest.predicted_s:.3g} s; give a deadline_s of at least "
                f"{needed:.3g} (retrying will not help)",
            )
        backlog = pace * sum(w.seconds for w in self._live_work(exclude=job))
        return ServiceUnavailable(
            429,
            f"cannot finish within its deadline of {budget:.3g} s behind about {backlog:.2g} s of work ahead, "
            "even at the cheapest setting it allows; retry later",
            max(1, math.ceil(backlog)),
        )

    def choices(self, request: ImageRequest) -> list[Choice]:
        """Ways to run a request, most expensive first: its own options, then (elastic quality) each
        rung of the ladder cheaper than the way before it, down to the lowest rung allowed."""
        rungs, tuned = self.ladder.rungs, self.ladder.tuned
        at_top = request.recommended or request.options == rungs[0]
        own = Choice(
            request.options, 0 if at_top else None, self.predict(request, request.options), tuned if at_top else None
        )
        exact = request.quality != "elastic" and not isinstance(request.quality, int)
        if exact or request.options.churn is not None or self.prices.model is None:
            return [own]
        lowest = request.quality if isinstance(request.quality, int) else len(rungs) - 1
        # The rungs' own guidance applies unless the request asked for guidance of its own.
        own_guidance = (request.options.guidance, request.options.guidance_interval)
        taken = TRAJECTORY_FIELDS + (
            () if own_guidance != (rungs[0].guidance, rungs[0].guidance_interval) else GUIDANCE_FIELDS
        )
        out = [own]
        for rung, setting in enumerate(rungs[: lowest + 1]):
            options = replace(request.options, **{name: getattr(setting, name) for name in taken})
            predicted = self.predict(request, options)
            if predicted < CHEAPER * out[-1].predicted_s:
                out.append(Choice(options, rung, predicted, tuned))
        return out

    def predict(self, request: ImageRequest, options: SamplingOptions) -> float:
        """Seconds the request takes alone with these options (0 without a cost model)."""
        model, canvas = self.manifest.model, request.canvas(self.manifest.model)
        return self.prices.seconds(
            (options, canvas, request.num), lambda: engine_work(options, model, canvas, request.num)
        )

    def _live_work(self, exclude: Job | None = None) -> list[Work]:
        return [j.work() for j in self.store.live() if j is not exclude]

    def _choose_locked(self, job: Job, now: float) -> Choice | None:
        """The policy's choice for a job, among the live jobs (policy.choose)."""
        live = self._live_work(exclude=job)
        return choose(job.work(), job.choices, live, now, self.pace.value, self.config.max_active)

    # -- jobs -------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            job = self.store.get(job_id)
        return self.store.settled(job_id, job)

    def forget(self, job: Job) -> None:
        """Drop a job once its answer was delivered (synchronous requests)."""
        with self.lock:
            self.store.forget(job)

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Cancel a job: it says cancelled at once; a running one frees its slot at its next engine call."""
        if self.store.cancel_elsewhere(job):
            return
        with self.lock:
            status = 499 if self._accepting else 503
            if job.state == QUEUED:
                self._end_locked(job, CANCELLED, None, reason, status)
            elif job.state == RUNNING and job.slot is not None:
                job.state, job.error, job.status, job.finished = CANCELLED, reason, status, time.monotonic()
                self.batcher.cancel(job.slot)
                self.store.changed(job)

    def position(self, job: Job) -> int | None:
        """How many queued jobs run before this one (None once it runs)."""
        with self.lock:
            if job.state != QUEUED or job not in self.store.queue:  # running, ended, or another replica's
                return None
            now = time.monotonic()
            return sorted(self.store.queue, key=lambda j: urgency(j.work(), now)).index(job)

    @property
    def queued(self) -> int:
        return len(self.store.queue)

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
        return {**self.config.describe(), "backend": self.backend.name, "precision": self.backend.precision}

    def run_record(self, job: Job) -> dict:
        """What makes a job's images (the answer's X-Lego-Run header and PNG text, the job JSON): the
        options that run, the ladder rung they are (None: as asked), whether the tuner wrote it, and
        whether that is below what was asked."""
        request, choice = job.request, job.choice
        return {
            **request.describe(),
            "options": choice.options.to_dict(),
            "rung": choice.rung,
            "tuned": choice.tuned,
            "degraded": choice is not job.choices[0],
            "predicted_s": round(choice.predicted_s, 4),
            "pace": round(self.pace.value, 4),  # when it started: the server planned with predicted_s x pace
            "quality": request.quality,
            "backend": self.backend.name,
            "precision": {"files": self.files_precision, "runtime": self.backend.precision},
            "canvas": list(request.canvas(self.manifest.model)),
            "images": request.num,
            "checkpoint_sha256": self.manifest.source["sha256"],
        }

    # -- running ----------------------------------------------------------------------------------

    def _dispatch_locked(self, planned: Job | None = None) -> None:
        """Start the most urgent queued jobs while slots are free; each takes the best choice that
        still meets its deadline now, except the job admission planned just now (planned)."""
        queue = self.store.queue
        while queue and self._active < self.config.max_active:
            now = time.monotonic()
            job = min(queue, key=lambda j: urgency(j.work(), now))
            queue.remove(job)
            if job is not planned:
                job.choice = self._choose_locked(job, now) or job.choices[-1]
            job.run = self.run_record(job)
            choice = job.choice
            try:
                slot = self.batcher.join(
                    work_s=choice.predicted_s, order_by=job.order_by, priority=job.request.priority
                )
            except RequestCancelled:
                self._end_locked(job, CANCELLED, None, "the server is shutting down", 503)
                continue
            job.slot, job.state, job.started = slot, RUNNING, time.monotonic()
            self._account_locked()  # busy time is counted from here when the machine was idle
            self.metrics.count_rung(choice.rung, choice.tuned)
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
        except (EngineFailed, LegoError) as e:  # LegoError: e.g. NaN in an engine output
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
            end, choice = time.monotonic(), job.choice
            due = "no deadline" if job.deadline is None else f"{job.deadline - end:+.3f} s to its deadline"
            log.debug("job %s %s: rung %s, predicted %.3f s x pace %.2f, queued %.3f s, in its slot %.3f s, %s",
                      job.id, state, choice.rung, choice.predicted_s, job.run["pace"], job.started - job.created,
                      end - job.started, due)  # fmt: skip
        with self.lock:
            self._account_locked(slot.done_s)
            self._active -= 1
            self._end_locked(job, state, body, error, status, where)
            self._dispatch_locked()

    def _account_locked(self, finished_work_s: float = 0.0) -> None:
        """Busy wall time up to now and work finished, for the pace."""
        now = time.monotonic()
        self.pace.update(now - self._last_event if self._active > 0 else 0.0, finished_work_s)
        self._last_event = now

    def _end_locked(
        self, job: Job, state: str, body: bytes | None, error: str | None, status: int, where: str | None = None
    ) -> None:
        self.store.end(job, state, body, error, status, where)
        if job.state == DONE:
            self.metrics.finished(job.request.num, job.finished - job.created)
        else:
            self.metrics.count(job.state)
        self.lock.notify_all()

    def _expire_loop(self) -> None:
        """End jobs whose deadline passed: queued ones at once, running ones at their next engine call."""
        with self.lock:
            while not self.closed:
                now = time.monotonic()
                for job in [j for j in self.store.queue if j.deadline is not None and j.deadline < now]:
                    self._end_locked(job, EXPIRED, None, "deadline passed while queued", EXPIRED_STATUS, "queue")
                for job in self.store.live():
                    slot, due = job.slot, job.deadline
                    if job.state == RUNNING and due is not None and due < now and slot and not slot.expired:
                        self.batcher.expire(slot)
                upcoming = [j.deadline for j in self.store.live() if j.deadline is not None and j.deadline >= now]
                self.lock.wait(timeout=min([1.0, *(d - now + 1e-3 for d in upcoming)]))

    # -- shutdown ---------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        with self.lock:
            self._accepting = False

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running jobs finish for up to timeout seconds, cancel the rest (queued
        jobs at once; a running one stops within one engine chunk), and stop the batcher. Returns
        within about timeout + CLOSE_GRACE_S."""
        deadline = time.monotonic() + timeout
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._accepting = False
            while self.store.queue:
                self._end_locked(self.store.queue[0], CANCELLED, None, "the server is shutting down", 503)
            self.lock.wait_for(lambda: self._active == 0, timeout=max(0.0, deadline - time.monotonic()))
            running = [j for j in self.store.live() if j.state == RUNNING]
        for job in running:
            self.cancel(job, "the server is shutting down")
        self.batcher.close(CLOSE_GRACE_S)  # the ticks running stop at their next chunk
        with self.lock:
            self.lock.wait_for(lambda: self._active == 0, timeout=CLOSE_GRACE_S)
            self.lock.notify_all()  # the deadline watcher ends
        self._workers.shutdown(wait=False)


def encode(result: SampleResult, request: ImageRequest, record: dict | None = None) -> bytes:
    """The answer's bytes: a PNG grid (with the run record as text), or an npz of float32 images in
    [-1, 1] (and labels)."""
    from lego_export.images import make_grid, picture_bytes, run_text

    if request.format == "png":
        grid = make_grid(result.images, columns=min(request.columns, len(result.images)))
        return picture_bytes(grid, "PNG", run_text(record) if record is not None else None)
    buffer = io.BytesIO()
    if result.labels is None:
        np.savez(buffer, images=result.images)
    else:
        np.savez(buffer, images=result.images, labels=result.labels)
    return buffer.getvalue()
