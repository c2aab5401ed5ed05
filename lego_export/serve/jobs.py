"""Jobs and where they are kept: each request's lifecycle, the queue, eviction of finished jobs.

A job is ``queued`` until a slot frees, then ``running``, and ends ``done``, ``failed``,
``cancelled`` or ``expired`` (with where its deadline passed). :class:`JobStore` keeps the live
jobs and a bounded number of finished ones for ``GET /v1/jobs/{id}``; Ray replicas use a store with
the same interface that also publishes to a directory every replica reads (ray_app.py). The
service calls the store with its lock held.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from lego_export.serve.batcher import Slot
from lego_export.serve.policy import Choice, Work
from lego_export.serve.validation import ImageRequest

QUEUED, RUNNING, DONE, FAILED, CANCELLED, EXPIRED = "queued", "running", "done", "failed", "cancelled", "expired"
EXPIRED_IN = ("queue", "sampling", "answer")  # where an expired job was when its deadline passed
TERMINAL = (DONE, FAILED, CANCELLED, EXPIRED)
LIVE = (QUEUED, RUNNING)


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
    choice: Choice | None = None  # what it runs, once admitted
    deadline: float | None = None  # time.monotonic() by which it must finish (None: no deadline)
    order_by: float = math.inf  # the deadline the order uses (a job without one still ages)
    steps_done: int = 0
    started: float | None = None  # when it got its slot
    expired_in: str | None = None  # where it was when its deadline passed (EXPIRED_IN)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def work(self) -> Work:
        """The policy's view: a running job with what it has left, a queued one at its cheapest choice
        (it is planned again when it starts, down to that)."""
        if self.slot is not None:
            seconds = self.slot.remaining_s
        else:
            seconds = self.choices[-1].predicted_s if self.choices else 0.0
        return Work(
            self.id, seconds, self.order_by, self.created, self.request.priority, self.deadline, self.slot is not None
        )

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


class JobStore:
    """The jobs of one server: live ones, a queue of those waiting for a slot, and finished ones up to
    `keep` of them for at most `ttl_s` seconds."""

    def __init__(self, keep: int, ttl_s: float):
        self.keep, self.ttl_s = keep, ttl_s
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: deque[Job] = deque()

    def add(self, job: Job) -> None:
        """A new job, queued."""
        self.evict()
        self.jobs[job.id] = job
        self.queue.append(job)

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def settled(self, job_id: str, job: Job | None) -> Job | None:
        """get's answer once it holds for every reader (called without the service's lock): a store
        shared by replicas waits for the job's publication, or reads another replica's job."""
        return job

    def cancel_elsewhere(self, job: Job) -> bool:
        """Pass a cancel on to the replica that runs the job; False: the job is this server's."""
        return False

    def forget(self, job: Job) -> None:
        """Drop a job once its answer was delivered (or its result is no longer wanted)."""
        self.jobs.pop(job.id, None)

    def live(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state in LIVE]

    def end(self, job: Job, state: str, body: bytes | None, error: str | None, status: int, where: str | None) -> None:
        """A job ends (where: for an expired one, EXPIRED_IN's word for where its deadline passed); a
        job that already said it was cancelled stays cancelled."""
        if job in self.queue:
            self.queue.remove(job)
        if job.state == CANCELLED and job.finished is not None:
            state, body, error, status = CANCELLED, None, job.error, job.status
        job.state, job.body, job.error, job.status = state, body, error, status
        job.expired_in = where if state == EXPIRED else None
        job.finished = time.monotonic()
        job.slot = None
        job.future.set_result(job)
        self.changed(job)

    def changed(self, job: Job) -> None:
        """What a job says of itself changed (it ended, or says cancelled while its call runs on).
        Nothing to do here; a store shared by replicas publishes it."""

    def evict(self) -> None:
        """Bound the finished jobs kept: the oldest go first, and any past their time to live."""
        now = time.monotonic()
        finished = [j for j in self.jobs.values() if j.terminal]
        excess = len(finished) - self.keep
        for j in finished:
            if excess > 0 or now - j.finished > self.ttl_s:
                self.jobs.pop(j.id, None)
                excess -= 1
