"""The call batcher: the engine calls of every request in flight, run tick by tick.

Every in-flight request samples with its own :class:`~lego_export.runtime.pipeline.LegoPipeline` in
its own thread (its own plan, sampler state and noise: the offline code path), over a
:class:`BatchingBackend` whose runners hand each engine call to the :class:`CallBatcher` and block
until it returns that call's rows.

A tick runs the pending call of the request at the head of the policy's order (policy.in_order: by
arrival while that keeps every request in time, else the ones it would make late first). Calls of
other requests for the same engine join it where the cost model says one call is cheaper than two: a
tile carries its own conditioning row, so tiles of different requests, steps, canvases and plans fit
one call, and engine outputs do not depend on what else is in it (every request gets its offline
images). On a CPU a tile costs about the same in any batch, so calls rarely merge there. A tick runs
in the thread of a waiting request, usually the one whose call it runs. With several streams,
several ticks run at once, each on engines with a share of the threads; a request alone runs on all
of them. When a request's deadline passes, the service ends it (``expire``): its pending call fails
with RequestExpired instead of taking the engines.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from lego_export.arrays import NumpyArrays
from lego_export.errors import LegoError
from lego_export.manifest import EngineSpec, Manifest
from lego_export.runtime.backends import Backend
from lego_export.runtime.pipeline import LegoPipeline
from lego_export.runtime.runner import EngineRunner
from lego_export.serve.config import ServeConfig
from lego_export.serve.cost import CostModel, Prices, best_chunk
from lego_export.serve.metrics import TILE_BUCKETS, Histogram
from lego_export.serve.policy import Pace, Work, in_order

# A request hands its whole evaluation to the batcher at once; the batcher cuts calls to the engine's range.
UNBOUNDED_N = 2**62


class RequestCancelled(Exception):
    """Raised in a request's thread when the request was cancelled (by its client or at shutdown)."""


class RequestExpired(Exception):
    """Raised in a request's thread when its deadline passed before it finished."""


class EngineFailed(Exception):
    """An engine raised while running a call that held this request's tiles."""

    def __init__(self, engine: str, message: str):
        super().__init__(f"{engine} failed: {message}")
        self.engine = engine


@dataclass
class EngineStats:
    """Counters of one engine (written under the batcher's stats lock)."""

    calls: int = 0
    tiles: int = 0
    capacity: int = 0  # sum over calls of the chunk size aimed at: tiles / capacity is the fill ratio
    seconds: float = 0.0
    failures: int = 0
    groups: int = 0  # calls as the requests submitted them merged into one, each cut into chunks
    group_requests: int = 0  # requests served by those groups
    tiles_per_call: Histogram = field(default_factory=lambda: Histogram(TILE_BUCKETS))


@dataclass
class BatcherStats:
    ticks: int = 0
    narrow_ticks: int = 0  # of which on the narrow runners, beside other requests' calls
    slack_ticks: int = 0  # of which not in arrival order (it would have made a request late)
    tick_seconds: float = 0.0  # wall time of the ticks (merging, engine calls, scatter)
    engine_seconds: float = 0.0  # of which inside the real engines
    requests_joined: int = 0
    engines: dict[str, EngineStats] = field(default_factory=lambda: defaultdict(EngineStats))

    @property
    def overhead_fraction(self) -> float:
        """Share of tick time spent merging and scattering rather than in engines."""
        return max(0.0, 1.0 - self.engine_seconds / self.tick_seconds) if self.tick_seconds else 0.0


class Slot:
    """One in-flight request's place in the batcher, and what orders it against the others."""

    def __init__(
        self,
        number: int,
        *,
        work_s: float = 0.0,
        order_by: float | None = None,
        priority: int = 0,
        lock: threading.RLock | None = None,
    ):
        self.number = number
        self.wake = threading.Condition(lock)  # its request's thread waits here (the batcher's lock)
        self.cancelled = False
        self.expired = False
        self.blocked = False  # waiting on an engine call
        self.call: EngineCall | None = None
        self.work_s = work_s  # predicted seconds of the whole request (cost.py); 0: unknown
        self.done_s = 0.0  # predicted seconds of the calls it has had
        self.order_by = math.inf if order_by is None else order_by  # time.monotonic() it is ordered by
        self.priority = priority

    @property
    def remaining_s(self) -> float:
        return max(0.0, self.work_s - self.done_s)

    def work(self) -> Work:
        """The policy's view of this request."""
        return Work(self, self.remaining_s, self.order_by, self.number, self.priority)


@dataclass(eq=False)  # calls are compared by identity: their feeds are arrays
class EngineCall:
    engine: str
    feeds: dict
    n: int
    slot: Slot
    done: threading.Event = field(default_factory=threading.Event)
    outputs: dict | None = None
    error: BaseException | None = None

    @property
    def key(self) -> tuple:
        """Calls merge when they are for the same engine with the same per-row shapes (a decoder's
        latent size varies by request; brick and embedder rows never do)."""
        return (self.engine, *(tuple(self.feeds[k].shape[1:]) for k in sorted(self.feeds)))


class CallBatcher:
    """Owns one real backend and runs every request's engine calls, most urgent first, in chunks."""

    def __init__(
        self,
        manifest: Manifest,
        backend: Backend,
        config: ServeConfig | None = None,
        pace: Pace | None = None,
        narrow_backend: Backend | None = None,
    ):
        """backend: whose runners do the work, on all the engine threads; config: the server's
        (max_batch_tiles, calibrate, streams); pace: the service's; narrow_backend: the same engines
        on a 1/streams share of the threads, for ticks that run beside others."""
        config = config or ServeConfig(calibrate=False)
        self.manifest, self.backend, self.config = manifest, backend, config
        self.pace = pace or Pace()
        if config.streams < 1:  # no tick thread: every request would wait forever
            raise LegoError(f"streams must be at least 1, got {config.streams}")
        self.arrays = backend.arrays
        self.limits = {spec.name: self._limit(spec) for spec in manifest.engines}
        self.runners = self._runners(backend)
        self.calibration: dict[str, dict[int, float]] = {}  # seconds per row at each N measured
        if config.calibrate:
            for spec in manifest.engines:
                runner = self.runners[spec.name]
                runner.max_rows, self.calibration[spec.name] = best_chunk(
                    runner, spec, self.limits[spec.name], runner.arrays
                )
        # A request alone runs on all the threads; requests side by side each on their share.
        self.narrow_runners = self.runners
        if narrow_backend is not None and config.streams > 1:
            self.narrow_runners = self._runners(narrow_backend)
            for name, runner in self.narrow_runners.items():
                runner.max_rows = self.runners[name].max_rows
        # Without calibration no cost model: requests run in arrival order and calls never merge.
        self.prices = Prices(CostModel.from_calibration(self.calibration, self.chunks) if self.calibration else None)
        self.stats = BatcherStats()
        for spec in manifest.engines:  # every key exists from the start: readers never see one added
            self.stats.engines[spec.name] = EngineStats()
        # One lock; each request's thread waits on its slot's own condition and is woken only when its
        # call is done or it should lead the next tick: a thread woken for nothing takes a core from
        # the engine's threads.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # close() waits here for the ticks to end
        self._pending: list[EngineCall] = []
        self._active: set[Slot] = set()
        self._running = 0  # active slots not blocked on a call
        self._ticking = 0  # ticks running now (at most config.streams)
        self._numbers = itertools.count()
        self._closing = False
        self._stats_lock = threading.Lock()  # ticks of several streams count into the same stats

    def _runners(self, backend: Backend) -> dict[str, EngineRunner]:
        return {  # a latent decoder runs on host arrays on every backend
            spec.name: EngineRunner(
                spec,
                backend.runner(spec),
                NumpyArrays() if spec.role == "decoder" else self.arrays,
                self.limits[spec.name],
            )
            for spec in self.manifest.engines
        }

    @property
    def chunks(self) -> dict[str, int]:
        """Rows per call the batcher aims at, per engine (at most its limit)."""
        return {name: r.max_rows for name, r in self.runners.items()}

    def _limit(self, spec: EngineSpec) -> int:
        cap = self.config.max_batch_tiles
        return min(spec.batch["max"], cap) if cap > 0 else spec.batch["max"]

    # -- requests' side ---------------------------------------------------------------------------

    def join(self, **order) -> Slot:
        """A slot for a new request (order: Slot's keywords); it counts as running until its first call."""
        with self._cond:
            if self._closing:
                raise RequestCancelled("the batcher is shutting down")
            slot = Slot(next(self._numbers), **order, lock=self._lock)
            self._active.add(slot)
            self._running += 1
            self.stats.requests_joined += 1
            return slot

    def leave(self, slot: Slot) -> None:
        """The request is done (or failed): no tick waits for it any more."""
        with self._cond:
            if slot in self._active:
                self._active.discard(slot)
                if not slot.blocked:
                    self._running -= 1
                self._nudge_locked()

    def pipeline(self, slot: Slot) -> LegoPipeline:
        """A pipeline for one request whose engine calls go through this batcher."""
        return LegoPipeline(self.manifest, BatchingBackend(self, slot), max_rows=UNBOUNDED_N)

    def cancel(self, slot: Slot) -> None:
        """Cancel a request: its pending call (if any) fails at once, later calls fail when submitted."""
        self._stop(slot, "cancelled", RequestCancelled("cancelled"))

    def expire(self, slot: Slot) -> None:
        """End a request whose deadline passed (the service decides when): as cancel, with RequestExpired."""
        self._stop(slot, "expired", RequestExpired("deadline passed"))

    def _stop(self, slot: Slot, flag: str, error: Exception) -> None:
        with self._cond:
            setattr(slot, flag, True)
            call = slot.call
            if call is not None and call in self._pending:
                self._pending.remove(call)
                self._finish_locked(call, None, error)
                self._nudge_locked()  # the order's head may have changed

    def submit(self, slot: Slot, engine: str, feeds: dict) -> dict:
        """Queue one engine call and block until the tick that ran it hands back its rows."""
        call = EngineCall(engine, feeds, int(next(iter(feeds.values())).shape[0]), slot)
        with self._cond:
            if slot.expired:
                raise RequestExpired("deadline passed")
            if slot.cancelled:
                raise RequestCancelled("cancelled")
            slot.call, slot.blocked = call, True
            self._running -= 1
            self._pending.append(call)
            # Wait, running any tick that may start on the way: a call's tick usually becomes ready as
            # its own request submits it, and runs in that thread with no hand-over between threads.
            while not call.done.is_set():
                taken = self._take()
                if taken is None:
                    slot.wake.wait()
                    continue
                self._nudge_locked(but=slot)  # with several streams, another may lead a tick beside this one
                self._cond.release()
                try:
                    self._tick(*taken)
                finally:
                    self._cond.acquire()
                    self._ticking -= 1
                    self._cond.notify_all()  # close() may wait for the ticks to end
                    self._nudge_locked(but=slot)  # this thread looks again itself
        if call.error is not None:
            raise call.error
        if slot.expired:
            raise RequestExpired("deadline passed")
        if slot.cancelled:  # cancelled while its call ran: drop the result
            raise RequestCancelled("cancelled")
        return call.outputs

    # -- the loop ---------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests in the batcher now."""
        return len(self._active)

    @property
    def pending(self) -> int:
        """Engine calls waiting for a tick."""
        with self._cond:
            return len(self._pending)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel every request still in the batcher, wait up to timeout seconds for the running
        ticks (they stop at their next chunk), then close the engines."""
        with self._cond:
            self._closing = True
            for slot in list(self._active):
                slot.cancelled = True
            for call in self._pending:
                self._finish_locked(call, None, RequestCancelled("the server is shutting down"))
            self._pending = []
            self._cond.notify_all()
            idle = self._cond.wait_for(lambda: self._ticking == 0, timeout)
        if idle:  # nothing can call an engine any more
            for runner in {*self.runners.values(), *self.narrow_runners.values()}:
                runner.close()

    def _take(self) -> tuple[list[EngineCall], dict[str, EngineRunner]] | None:
        """The calls of the next tick, if one may start now (taken off the pending list, the tick
        counted as running), and the runners it runs on: all the threads' for a request alone, the
        narrow ones beside other requests; else None. Called with the lock held."""
        if not self._stream_free():
            return None
        order, rescued = self._in_order()
        if not self._ready(order):
            return None
        self.stats.slack_ticks += rescued
        group = self._most_urgent(order)
        self._pending = [c for c in self._pending if c not in group]
        alone = self._ticking == 0 and len(self._active) <= 1
        self._ticking += 1
        return group, self.runners if alone else self.narrow_runners

    def _nudge_locked(self, but: Slot | None = None) -> None:
        """If a tick may start now, wake one request waiting on a pending call (not but's) to lead it
        (any waiting thread may run any call). Only then: a thread woken for nothing takes a core
        from the engine call running beside it."""
        if not (self._stream_free() and self._ready()):
            return
        waiting = next((c.slot for c in self._pending if c.slot is not but), None)
        if waiting is not None:
            waiting.wake.notify()

    def _stream_free(self) -> bool:
        """Whether a call waits and a stream is free for it (a tick starts if _ready too)."""
        return not self._closing and self._ticking < self.config.streams and bool(self._pending)

    def _ready(self, order: list[Slot] | None = None) -> bool:
        """Whether a tick may start: every active request waits on a call, or the request at the head
        of the order does (its call runs first anyway: it must not wait for the others' host work
        between their calls); with several streams any pending call may take a free one (the head's
        next call then waits at most for one call of another stream). order: when already known."""
        if self._running <= 0 or self.config.streams > 1:
            return True
        head = (order or self._in_order()[0])[0]
        return head.blocked and head.call in self._pending

    def _most_urgent(self, order: list[Slot]) -> list[EngineCall]:
        """The call of the first request in order that has one pending, with the calls that are
        cheaper merged into it than run apart (same engine and row shapes, within the engine's limit)."""
        rank = {id(slot): i for i, slot in enumerate(order)}
        live = sorted(self._pending, key=lambda c: rank.get(id(c.slot), len(rank)))
        group, rows, cost = [live[0]], live[0].n, self.prices.model
        for call in live[1:] if cost is not None else ():
            fits = rows + call.n <= self.limits[call.engine]
            if call.key == group[0].key and fits and cost.merge_pays(call.engine, rows, call.n):
                group.append(call)
                rows += call.n
        return group

    def _in_order(self) -> tuple[list[Slot], bool]:
        """The active requests in the policy's order at the service's pace, and whether it differs
        from arrival order."""
        order, rescued = in_order([slot.work() for slot in self._active], time.monotonic(), self.pace.value)
        return [w.key for w in order], rescued  # type: ignore[misc]  # the keys are the slots

    def _tick(self, group: list[EngineCall], runners: dict[str, EngineRunner]) -> None:
        """One engine over the concatenated rows of several calls, in chunks; rows go back per call.
        When the merged call fails, each call runs alone, so that a bad request fails only itself."""
        start = time.perf_counter()
        live = [c for c in group if not c.slot.cancelled]
        for call in group:
            if call.slot.cancelled:
                self._finish(call, None, RequestCancelled("cancelled"))
        try:
            if live:
                self._run(live, runners)
        finally:
            with self._stats_lock:
                self.stats.ticks += 1
                self.stats.narrow_ticks += runners is not self.runners
                self.stats.tick_seconds += time.perf_counter() - start

    def _run(self, calls: list[EngineCall], runners: dict[str, EngineRunner]) -> None:
        stats = self.stats.engines[calls[0].engine]
        with self._stats_lock:
            stats.groups += 1
            stats.group_requests += len(calls)
        try:
            outputs = self._run_rows(calls, runners)
        except RequestCancelled as e:  # every request in the call was cancelled while it ran
            for call in calls:
                self._finish(call, None, e)
            return
        except Exception:
            for call in calls:
                try:
                    self._finish(call, self._run_rows([call], runners), None)
                except Exception as e:  # noqa: BLE001 - any engine error becomes this request's failure
                    with self._stats_lock:
                        stats.failures += 1
                    self._finish(call, None, EngineFailed(call.engine, str(e).splitlines()[0] if str(e) else repr(e)))
            return
        offset = 0
        for call in calls:
            self._finish(call, {k: v[offset : offset + call.n] for k, v in outputs.items()}, None)
            offset += call.n

    def _run_rows(self, calls: list[EngineCall], runners: dict[str, EngineRunner]) -> dict:
        """The engine over all rows of calls, in near-equal chunks of at most its chunk size (the
        runner's max_rows); between chunks, a call whose every request was cancelled stops."""
        runner = runners[calls[0].engine]
        if len(calls) == 1:
            merged = calls[0].feeds
        else:
            merged = {k: runner.arrays.concat([c.feeds[k] for c in calls]) for k in calls[0].feeds}
        stop = lambda: all(c.slot.cancelled for c in calls)  # noqa: E731
        return runner.infer(merged, _Counted(self.stats, runner.max_rows, self._stats_lock, stop))

    def _finish(self, call: EngineCall, outputs: dict | None, error: BaseException | None) -> None:
        with self._cond:
            self._finish_locked(call, outputs, error)

    def _finish_locked(self, call: EngineCall, outputs: dict | None, error: BaseException | None) -> None:
        call.outputs, call.error = outputs, error
        slot = call.slot
        if outputs is not None:  # progress, in predicted seconds
            slot.done_s += self.prices.call_done_s(call.engine, call.n)
        if slot.blocked and slot.call is call:
            slot.blocked, slot.call = False, None
            if slot in self._active:
                self._running += 1  # counted before the wake-up, so no tick starts without it
        call.done.set()
        slot.wake.notify()


class BatchingBackend(Backend):
    """A backend for one request's pipeline: its runners submit calls to the batcher."""

    name = "batching"

    def __init__(self, batcher: CallBatcher, slot: Slot):
        self.batcher, self.slot = batcher, slot
        self.arrays = batcher.arrays
        self.precision = batcher.backend.precision
        self.device = batcher.backend.device

    def runner(self, spec: EngineSpec) -> _BatchingRunner:
        return _BatchingRunner(self.batcher, self.slot, spec.name)


class _BatchingRunner:
    def __init__(self, batcher: CallBatcher, slot: Slot, engine: str):
        self.batcher, self.slot, self.engine = batcher, slot, engine

    def infer(self, feeds: dict) -> dict:
        return self.batcher.submit(self.slot, self.engine, feeds)


class _Counted:
    """Counts each chunk an EngineRunner runs into the batcher's stats; stops a cancelled call."""

    def __init__(self, stats: BatcherStats, chunk_rows: int, lock: threading.Lock, stop: Callable[[], bool]):
        self.stats, self.chunk_rows, self.lock, self.stop = stats, chunk_rows, lock, stop

    def add(self, name: str, seconds: float | None, rows: int) -> None:
        stats = self.stats.engines[name]
        with self.lock:
            stats.calls += 1
            stats.tiles += rows
            stats.capacity += self.chunk_rows
            stats.seconds += seconds or 0.0
            stats.tiles_per_call.observe(rows)
            self.stats.engine_seconds += seconds or 0.0
        if self.stop():
            raise RequestCancelled("cancelled")
