"""The scheduling policy: one urgency rule and one model of the machine, for admission and order alike.

Everything here is a function of snapshots (:class:`Work`): the service asks :func:`choose` how to
run a new or starting job, the batcher asks :func:`in_order` which request's engine call goes
next. Both predict with :func:`finishes`: the machine runs one job's work at a time (on a CPU a
tile costs about the same in any batch, so requests side by side take as long as in turn), at the
pace (wall seconds per predicted second, :class:`Pace`), each job taking a slot when one frees.
A finish counts as in time with a tenth of the time left to spare (:func:`finish_by`): the cost
model's median error is a few percent.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

from lego_export.options import SamplingOptions

SPARE = 0.9  # a finish within this share of the time left counts as in time
HEADROOM = 0.8  # a job runs as asked only if that leaves a fifth of its time to spare
PACE_EVERY_S = 0.5  # the pace is updated once this much predicted work has finished (seconds)


def finish_by(deadline: float, now: float, share: float = SPARE) -> float:
    """The latest predicted finish that counts as in time: within this share of the time left."""
    return now + share * (deadline - now)


@dataclass(frozen=True)
class Choice:
    """One way to run a request: its own options (rung None) or a rung of the ladder, and its price."""

    options: SamplingOptions
    rung: int | None = None
    predicted_s: float = 0.0  # alone on the machine; 0 without a cost model
    tuned: bool | None = None  # the rung came from lego-export tune (None: the request's own options)


@dataclass(frozen=True)
class Work:
    """A job as the policy sees it: what orders it and the predicted seconds of work it has left."""

    key: Hashable
    seconds: float
    order_by: float  # its deadline, or for a job without one a horizon it ages towards
    arrival: float
    priority: int = 0
    deadline: float | None = None
    started: bool = True  # holds a slot


def urgency(w: Work, now: float) -> tuple:
    """Most urgent first: higher priority, then least slack (time to order_by less work left), then arrival."""
    return (-w.priority, w.order_by - now - w.seconds, w.arrival)


def finishes(order: Sequence[Work], now: float, pace: float, slots: int | None = None) -> dict[Hashable, float]:
    """Predicted finish of each job: one job's work at a time, the first in `order` among those holding
    a slot; a job without one takes a slot when one frees (up to `slots`), in `order`."""
    position = {w.key: i for i, w in enumerate(order)}
    running = [(position[w.key], w) for w in order if w.started]
    heapq.heapify(running)
    waiting = [w for w in order if not w.started]
    limit = math.inf if slots is None else slots
    finish, out = now, {}
    while running or waiting:
        while waiting and len(running) < limit:
            w = waiting.pop(0)
            heapq.heappush(running, (position[w.key], w))
        w = heapq.heappop(running)[1]
        finish += pace * w.seconds
        out[w.key] = finish
    return out


def late(order: Sequence[Work], now: float, pace: float) -> list[Work]:
    """The jobs that would not finish in time (with SPARE) run in this order."""
    done = finishes(order, now, pace)
    return [w for w in order if done[w.key] > finish_by(w.order_by, now)]


def in_order(jobs: Sequence[Work], now: float, pace: float) -> tuple[list[Work], bool]:
    """The order engine calls take, and whether it differs from arrival: by arrival (priority first)
    while that keeps every job in time; else the jobs it would make late first, most urgent first,
    the rest behind them by arrival; all by urgency when that too leaves one late. Taking short jobs
    first whenever it is safe, or reordering all when one is at risk, makes the largest wait on
    every small one that arrives."""
    ordered = sorted(jobs, key=lambda w: (-w.priority, w.arrival))
    at_risk = late(ordered, now, pace)
    if not at_risk:
        return ordered, False
    keys = {w.key for w in at_risk}
    rescued = sorted(at_risk, key=lambda w: urgency(w, now)) + [w for w in ordered if w.key not in keys]
    if not late(rescued, now, pace):
        return rescued, True
    return sorted(ordered, key=lambda w: urgency(w, now)), True


def choose(
    job: Work,
    choices: Sequence[Choice],
    live: Sequence[Work],
    now: float,
    pace: float,
    slots: int,
    headroom: float = HEADROOM,
) -> Choice | None:
    """How a job runs: the first (most expensive) of its choices that finishes within `headroom` of
    the time to its deadline, else the cheapest that finishes in time, else None; never taking a
    live job's spare time nor making it late. A job without a deadline runs as asked (choices[0])."""
    if job.deadline is None:
        return choices[0]
    by_urgency = sorted(live, key=lambda w: urgency(w, now))
    before = finishes(by_urgency, now, pace, slots)
    # A live job in time keeps its spare time, or what it has left of it.
    latest = {
        w.key: max(finish_by(w.deadline, now), before[w.key])
        for w in live
        if w.deadline is not None and before[w.key] <= w.deadline
    }
    in_time = None
    for choice in choices:
        trial = replace(job, seconds=choice.predicted_s)
        after = finishes(sorted([*live, trial], key=lambda w: urgency(w, now)), now, pace, slots)
        if after[job.key] <= finish_by(job.deadline, now) and all(after[k] <= t for k, t in latest.items()):
            if after[job.key] <= finish_by(job.deadline, now, headroom):
                return choice
            in_time = choice
    return in_time


@dataclass
class Pace:
    """Wall seconds the machine takes, while busy, per second of predicted work: it corrects the cost
    model for what a run alone does not show (contention, the machine's drift, a startup fit's bias).
    An exponential average over windows of PACE_EVERY_S predicted seconds, within [0.5, 3]."""

    value: float = 1.0
    busy_s: float = 0.0
    work_s: float = 0.0

    def update(self, busy_s: float, work_s: float) -> None:
        self.busy_s += busy_s
        self.work_s += work_s
        if self.work_s >= PACE_EVERY_S:
            measured = min(3.0, max(0.5, self.busy_s / self.work_s))
            self.value = 0.7 * self.value + 0.3 * measured
            self.busy_s = self.work_s = 0.0
