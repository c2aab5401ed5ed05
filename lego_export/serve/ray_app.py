"""lego-serve on Ray Serve: the same HTTP API, served by replicas autoscaled on queue depth.

    serve run lego_export.serve.ray_app:build_app engines=/abs/path/engines max_replicas=4

Each replica is a whole lego-serve but for the socket: its own engines, batcher (the tiles of the
requests routed to it share engine calls) and FastAPI app (app.py). Ray Serve adds replicas while
their ongoing requests (queued + sampling) stay above ``target_ongoing_requests``. An asynchronous
job can be read or cancelled through any replica: the one that runs it publishes it to a job
directory actor, through which cancels sent to other replicas reach it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from lego_export.errors import LegoError
from lego_export.serve.config import ServeConfig, config_fields
from lego_export.serve.jobs import LIVE, Job, JobStore
from lego_export.serve.validation import ImageRequest

DIRECTORY_NAME = "lego-serve-jobs"
CANCEL_POLL_S = 0.5  # how often a replica looks for cancels of its jobs sent to other replicas
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
KINDS = {bool: "true or false", int: "an integer", float: "a number"}  # what an error says a value must be


@dataclass
class RayOptions:
    """The deployment: what every replica serves (lego-serve's settings, by the same keys; threads 0
    means the replica's num_cpus), and how many replicas."""

    serve: ServeConfig = field(default_factory=ServeConfig)
    num_cpus: float = 2.0  # cores reserved per replica (its engines' threads)
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 0.0  # 0: max_active, the requests one replica batches at once

    @classmethod
    def from_args(cls, args: dict) -> RayOptions:
        """From `serve run ... key=value` arguments (strings) or a dict of values; every lego-serve
        setting checked as lego-serve checks it, named by its key."""
        own = {f.name: f.default for f in fields(cls) if f.name != "serve"}
        known = {**{f.name: f.default for f in config_fields()}, **own}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise LegoError(f"unknown lego-serve Ray option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        typed = {key: _typed(key, value, type(known[key])) for key, value in args.items()}
        options = cls(**{k: v for k, v in typed.items() if k in own})
        if not (math.isfinite(options.num_cpus) and options.num_cpus > 0):
            raise LegoError(f"num_cpus must be a positive number, got {options.num_cpus}")
        if not (math.isfinite(options.target_ongoing_requests) and options.target_ongoing_requests >= 0):
            raise LegoError(f"target_ongoing_requests must be 0 or more, got {options.target_ongoing_requests}")
        if not 1 <= options.min_replicas <= options.max_replicas:
            raise LegoError(
                f"replicas: need 1 <= min_replicas <= max_replicas, got {options.min_replicas}, {options.max_replicas}"
            )
        config = ServeConfig(**{k: v for k, v in typed.items() if k not in own})
        options.serve = replace(
            config,
            engines=str(Path(config.engines).resolve()),  # replicas may start in another folder
            threads=config.threads or max(1, int(options.num_cpus)),
        ).check()  # an OptionError names the key
        return options


def _typed(key: str, value, kind: type):
    """A `key=value` argument as its field's type (values already of that type pass through)."""
    if kind is bool and str(value).lower() in BOOLS:
        return BOOLS[str(value).lower()]
    if kind is int and not isinstance(value, bool | float):
        with contextlib.suppress(ValueError):
            return int(value)
    if kind is float:
        with contextlib.suppress(ValueError):
            return float(value)
    if kind in KINDS:
        raise LegoError(f"{key} must be {KINDS[kind]}, got {value!r}")
    return str(value)


class SharedJobStore(JobStore):
    """A job store whose asynchronous jobs any replica can read and cancel: the replica that runs a
    job publishes it to the directory actor; a cancel sent to another replica reaches it through the
    directory, which this replica polls (start())."""

    def __init__(self, keep: int, ttl_s: float, directory):
        super().__init__(keep, ttl_s)
        self.directory = directory
        # job id -> its last write to the directory: a job this replica says has ended is answered
        # only once that write is done, so no later read through another replica sees it running
        self._written: dict[str, object] = {}

    def start(self, service) -> None:
        """Poll the directory for cancels of this replica's jobs, and cancel them in service."""
        self.service = service
        threading.Thread(target=self._poll_cancels, name="lego-cancels", daemon=True).start()

    def add(self, job: Job) -> None:
        super().add(job)
        self.changed(job)

    def changed(self, job: Job) -> None:
        # Sent under the lock that changed the job, so no read sees the change before the write is sent.
        if job.request.is_async:
            self._written[job.id] = self.directory.put.remote(job.id, _record(job))

    def settled(self, job_id: str, job: Job | None) -> Job | None:
        if job is not None:
            written = self._written.pop(job_id, None)
            if written is not None:
                _ray().get(written)
            return job
        record = _ray().get(self.directory.get.remote(job_id))
        return None if record is None else _remote_job(job_id, record)

    def cancel_elsewhere(self, job: Job) -> bool:
        """Pass a cancel on to the replica that runs the job (it sees it within CANCEL_POLL_S)."""
        if self.get(job.id) is job:
            return False
        _ray().get(self.directory.cancel.remote(job.id))
        return True

    def forget(self, job: Job) -> None:
        super().forget(job)
        if job.request.is_async:
            self._written.pop(job.id, None)
            self.directory.forget.remote(job.id)

    def evict(self) -> None:
        super().evict()
        for job_id in list(self._written):  # a copy: settled() pops without the service's lock
            if job_id not in self.jobs:
                self._written.pop(job_id, None)

    def _poll_cancels(self) -> None:
        while not self.service.closed:
            time.sleep(CANCEL_POLL_S)
            with self.service.lock:
                mine = [j.id for j in self.jobs.values() if j.request.is_async and j.state in LIVE]
            if not mine:
                continue
            with contextlib.suppress(Exception):  # the directory briefly unreachable: try again later
                for job_id in _ray().get(self.directory.cancelled.remote(mine)):
                    job = self.service.get(job_id)
                    if job is not None:
                        self.service.cancel(job, "cancelled by the client")


def _ray():
    import ray

    return ray


RECORDED = ("state", "body", "error", "status", "expired_in")  # a job's outcome, as its owner last wrote it


def _record(job: Job) -> dict:
    return {**{key: getattr(job, key) for key in RECORDED}, "format": job.request.format, "info": job.describe()}


class RemoteJob(Job):
    """A read-only view of a job that another replica owns: its JSON as that replica last wrote it."""

    info: dict

    def describe(self, position: int | None = None) -> dict:
        return self.info


def _remote_job(job_id: str, record: dict) -> Job:
    job = RemoteJob(job_id, ImageRequest(format=record["format"], is_async=True))
    for key in (*RECORDED, "info"):
        setattr(job, key, record[key])
    return job


class JobDirectory:
    """Outcomes of asynchronous jobs, shared by the replicas (a Ray actor; bounded in size)."""

    def __init__(self, keep: int = 1024):
        self.keep = keep
        self.records: dict[str, dict] = {}
        self.cancels: set[str] = set()

    def put(self, job_id: str, record: dict) -> None:
        self.records.pop(job_id, None)
        self.records[job_id] = record
        while len(self.records) > self.keep:  # oldest first (dicts keep insertion order)
            self.records.pop(next(iter(self.records)))

    def get(self, job_id: str) -> dict | None:
        return self.records.get(job_id)

    def forget(self, job_id: str) -> None:
        self.records.pop(job_id, None)
        self.cancels.discard(job_id)

    def cancel(self, job_id: str) -> None:
        if job_id in self.records and self.records[job_id]["state"] in LIVE:
            self.cancels.add(job_id)

    def cancelled(self, job_ids: list[str]) -> list[str]:
        found = [j for j in job_ids if j in self.cancels]
        self.cancels.difference_update(found)
        return found


def job_directory():
    """The one directory actor of this Ray namespace (created on first use, detached)."""
    actor = _ray().remote(num_cpus=0)(JobDirectory)
    return actor.options(name=DIRECTORY_NAME, lifetime="detached", get_if_exists=True).remote()


def deployment(options: RayOptions):
    """The Ray Serve deployment class, configured by options."""
    from ray import serve

    @serve.deployment(
        name="lego-serve",
        ray_actor_options={"num_cpus": options.num_cpus},
        max_ongoing_requests=options.serve.max_active + options.serve.max_queue,
        autoscaling_config={
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests or options.serve.max_active,
        },
        graceful_shutdown_timeout_s=options.serve.drain_timeout + 5,
    )
    @serve.ingress()
    class LegoServeReplica:
        def __init__(self, opts: RayOptions):
            from lego_export.serve.service import ImageService

            config = opts.serve
            store = SharedJobStore(config.keep_jobs, config.job_ttl_s, job_directory())
            self.service = ImageService(config, store=store)
            store.start(self.service)

        def __serve_build_asgi_app__(self):
            from lego_export.serve.app import create_app

            return create_app(self.service, on_shutdown=lambda: self.service.close(self.service.config.drain_timeout))

    return LegoServeReplica


def build_app(args: dict | RayOptions):
    """Application builder for `serve run lego_export.serve.ray_app:build_app key=value ...`."""
    options = args if isinstance(args, RayOptions) else RayOptions.from_args(dict(args))
    if not (Path(options.serve.engines) / "manifest.json").is_file():
        raise LegoError(f"{options.serve.engines} holds no manifest.json: build engines with lego-export build")
    return deployment(options).bind(options)


@contextlib.contextmanager
def local_deployment(engines: str, port: int = 8000, cluster_cpus: int = 2, **options):
    """Start a local Ray instance, deploy on 127.0.0.1:port, yield the URL, shut everything down
    (tests and benchmarks)."""
    import ray
    from ray import serve

    opts = RayOptions.from_args({"engines": engines, "num_cpus": 1, **options})
    ray.init(
        num_cpus=cluster_cpus,
        include_dashboard=False,
        namespace="lego-serve",
        object_store_memory=100 * 2**20,
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(opts), name="lego", route_prefix="/", blocking=False)
        _wait_ready(f"http://127.0.0.1:{port}/healthz", 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def _wait_ready(url: str, timeout: float) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), opener.open(url, timeout=5) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise LegoError(f"the Ray Serve deployment did not answer {url} within {timeout:.0f} s")
