"""lego-serve on Ray Serve: the same HTTP API, served by replicas autoscaled on queue depth.

    serve run lego_export.serve.ray_app:build_app engines=/abs/path/engines max_replicas=4

Each replica is one lego-serve process in all but the socket: it loads the engines itself, runs
its own batcher (tiles of the requests routed to it share engine calls) and answers through the
FastAPI app of app.py. Ray Serve counts each replica's ongoing requests (queued + sampling) and adds
replicas while that stays above ``target_ongoing_requests``. Asynchronous jobs may be asked for on
any replica: the replica that ran a job publishes its outcome to a small job directory actor, and a
cancel that reaches another replica is passed on through it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from lego_export.errors import LegoError
from lego_export.options import OptionError
from lego_export.serve.config import ServeConfig, config_fields
from lego_export.serve.jobs import LIVE, Job, JobStore
from lego_export.serve.validation import ImageRequest

DIRECTORY_NAME = "lego-serve-jobs"
CANCEL_POLL_S = 0.5  # how often a replica looks for cancels of its jobs sent to other replicas


@dataclass
class RayOptions:
    """The deployment: what every replica serves (a ServeConfig, from the same keys as lego-serve's
    options: threads 0 means the replica's num_cpus), and how many replicas."""

    serve: ServeConfig = field(default_factory=ServeConfig)
    num_cpus: float = 2.0  # cores reserved per replica (its engines' threads)
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 0.0  # 0: max_active, the requests one replica batches at once

    @classmethod
    def from_args(cls, args: dict) -> RayOptions:
        """From `serve run ... key=value` arguments (strings) or a dict of values; every lego-serve
        setting checked as lego-serve checks it, named by its key."""
        serve_fields = {f.name: f for f in config_fields()}
        own = {f.name: f for f in fields(cls) if f.name != "serve"}
        unknown = sorted(set(args) - set(serve_fields) - set(own))
        if unknown:
            raise LegoError(
                f"unknown lego-serve Ray option {unknown[0]!r}; known: {', '.join(sorted({**serve_fields, **own}))}"
            )
        typed = {
            key: _typed(key, value, type((serve_fields.get(key) or own[key]).default)) for key, value in args.items()
        }
        try:
            config = ServeConfig(**{k: v for k, v in typed.items() if k in serve_fields})
            options = cls(serve=config, **{k: v for k, v in typed.items() if k in own})
            options.serve = replace(
                config,
                engines=str(Path(config.engines).resolve()),  # replicas may start elsewhere
                threads=config.threads or max(1, int(options.num_cpus)) if math.isfinite(options.num_cpus) else 1,
            ).check()
        except OptionError as e:
            raise LegoError(str(e)) from None
        if not (math.isfinite(options.num_cpus) and options.num_cpus > 0):
            raise LegoError(f"num_cpus must be a positive number, got {options.num_cpus}")
        if not (math.isfinite(options.target_ongoing_requests) and options.target_ongoing_requests >= 0):
            raise LegoError(f"target_ongoing_requests must be 0 or more, got {options.target_ongoing_requests}")
        if not 1 <= options.min_replicas <= options.max_replicas:
            raise LegoError(
                f"replicas: need 1 <= min_replicas <= max_replicas, got {options.min_replicas}, {options.max_replicas}"
            )
        return options


def _typed(key: str, value, kind: type):
    """A `key=value` argument as its field's type (values already typed pass through)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise LegoError(f"{key} must be true or false, got {value!r}")
    converter = {int: int, float: float}.get(kind, str)
    if converter is int and isinstance(value, bool | float):
        raise LegoError(f"{key} must be an integer, got {value!r}")
    try:
        return converter(value)
    except ValueError:
        raise LegoError(f"{key} must be {'an integer' if converter is int else 'a number'}, got {value!r}") from None


class SharedJobStore(JobStore):
    """A job store whose asynchronous jobs can be read and cancelled from any replica: the replica
    that runs a job publishes it to the directory actor; a cancel sent to another replica reaches
    it through the directory, which this replica polls (start())."""

    def __init__(self, keep: int, ttl_s: float, directory):
        super().__init__(keep, ttl_s)
        self.directory = directory
        # job id -> its last record written to the directory; a job this replica says has ended is
        # answered only once the directory says so too, so no later read through another replica
        # sees it still running
        self._written: dict[str, object] = {}

    def start(self, service) -> None:
        """Poll the directory for cancels of this replica's jobs, and cancel them in service."""
        self.service = service
        threading.Thread(target=self._poll_cancels, name="lego-cancels", daemon=True).start()

    def add(self, job: Job) -> None:
        super().add(job)
        if job.request.is_async:
            self.changed(job)

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

    def changed(self, job: Job) -> None:
        # Sent under the lock that changed the job, so no read sees the change before the write is sent.
        if job.request.is_async:
            self._written[job.id] = self.directory.put.remote(job.id, _record(job))

    def forget(self, job: Job) -> None:
        super().forget(job)
        if job.request.is_async:
            self._written.pop(job.id, None)
            self.directory.forget.remote(job.id)

    def evict(self) -> None:
        super().evict()
        for job_id in [j for j in self._written if j not in self.jobs]:
            del self._written[job_id]

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


def _record(job: Job) -> dict:
    return {
        "state": job.state,
        "body": job.body,
        "error": job.error,
        "status": job.status,
        "expired_in": job.expired_in,
        "format": job.request.format,
        "info": job.describe(),
    }


class RemoteJob(Job):
    """A read-only view of a job that another replica owns: its JSON as that replica last wrote it."""

    info: dict

    def describe(self, position: int | None = None) -> dict:
        return self.info


def _remote_job(job_id: str, record: dict) -> Job:
    job = RemoteJob(job_id, ImageRequest(format=record["format"], is_async=True))
    job.state, job.body, job.error, job.status = record["state"], record["body"], record["error"], record["status"]
    job.expired_in, job.info = record["expired_in"], record["info"]
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
    ray = _ray()
    actor = ray.remote(num_cpus=0)(JobDirectory)
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

    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            with opener.open(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise LegoError(f"the Ray Serve deployment did not answer {url} within {timeout:.0f} s")
        time.sleep(0.5)
