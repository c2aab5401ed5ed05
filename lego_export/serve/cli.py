"""lego-serve: an HTTP server that batches the brick tiles of every request in flight.

lego-serve --engines engines/                      # http://127.0.0.1:8000, one process
curl -s localhost:8000/v1/images -d '{"class": 7, "num": 8, "steps": 18}' -o grid.png
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading

import click

from lego_export.cli_common import CONTEXT
from lego_export.errors import LegoError
from lego_export.options import MAX_IMAGES, MAX_SIDE, MAX_STEPS
from lego_export.runtime.backends import BACKENDS, COMPUTE_PRECISIONS, MAX_THREADS
from lego_export.serve.batcher import ORDERS
from lego_export.serve.validation import Limits

# The server's numeric settings and their ranges, checked once here for lego-serve's flags and for
# Ray Serve's key=value options alike (make_config).
RANGES = {
    "threads": (0, MAX_THREADS),
    "streams": (0, 64),
    "max_batch_tiles": (0, 2**31 - 1),
    "max_active": (1, 4096),
    "max_queue": (0, 1_000_000),
    "max_resolution": (1, MAX_SIDE),
    "max_steps": (1, MAX_STEPS),
    "max_images": (1, MAX_IMAGES),
}
MAX_DRAIN_S = 86_400  # --drain-timeout's bound, for lego-serve and Ray alike


def _range(name: str) -> click.IntRange:
    return click.IntRange(*RANGES[name])


@click.command(context_settings=CONTEXT)
@click.option("--engines", default="engines", show_default=True, help="Folder written by lego-export build.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="Engine backend (one per process, shared by every request); auto chooses as lego-run does.",
)
@click.option(
    "--precision",
    type=click.Choice(COMPUTE_PRECISIONS),
    default="fp32",
    show_default=True,
    help="What the bricks compute in, as lego-run's --precision (int8: the graphs of lego-export build --int8).",
)
@click.option("--ckpt", default=None, help="Checkpoint for --backend torch.")
@click.option("--threads", type=_range("threads"), default=0, show_default=True, help="Engine threads (0 = all cores).")
@click.option(
    "--streams",
    type=_range("streams"),
    default=1,
    show_default=True,
    help="Engine calls of different requests that run at once, each on its share of the threads (ONNX Runtime, "
    "OpenVINO); a request alone still runs on all of them. 0: two on ONNX Runtime on a CPU of two or more "
    "cores, else one (measured: docs/serving.md).",
)
@click.option(
    "--max-batch-tiles",
    type=_range("max_batch_tiles"),
    default=0,
    show_default=True,
    help="Most tiles per engine call (0: each engine's N range from the manifest).",
)
@click.option(
    "--max-active",
    type=_range("max_active"),
    default=16,
    show_default=True,
    help="Requests sampling at once; their tiles share engine calls.",
)
@click.option(
    "--order",
    type=click.Choice(ORDERS),
    default="slack",
    show_default=True,
    help="Which engine calls run first. slack: the earliest request's while arrival order keeps every "
    "request in time, else the most urgent one's (least slack to its deadline, less its predicted "
    "remaining work), merged with others only where that is measurably cheaper; "
    "merge: every request's calls merged into one call per engine.",
)
@click.option(
    "--slo",
    default="none",
    show_default=True,
    help='Deadline of a request that gives no deadline_s: seconds ("30s") or a multiple of its own predicted '
    'time alone ("5x"). Requests that cannot meet theirs are refused (429) or, unless they ask for '
    '"quality": "exact", run at a cheaper rung of the model\'s quality ladder; late ones end as expired.',
)
@click.option(
    "--align/--no-align",
    default=True,
    show_default=True,
    help="With --order merge: each tick, run the earliest engine of the chain that has work, so that requests "
    "fall into step and later engines see them all in one call (--no-align: every engine with work, every tick).",
)
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    show_default=True,
    help="At startup, time each engine at N = 1, 2, 4, ... and cut merged calls at the N that runs fastest "
    "per tile (on a CPU often below the manifest maximum); --no-calibrate: the maximum (or --max-batch-tiles).",
)
@click.option(
    "--max-queue",
    type=_range("max_queue"),
    default=64,
    show_default=True,
    help="Requests waiting for a slot; more get 429.",
)
@click.option(
    "--max-resolution",
    type=_range("max_resolution"),
    default=256,
    show_default=True,
    help="Largest canvas side a request may ask for.",
)
@click.option(
    "--max-steps",
    type=_range("max_steps"),
    default=1000,
    show_default=True,
    help="Most sampling steps a request may ask for (the LEGO authors' FID recipe uses 256).",
)
@click.option("--max-images", type=_range("max_images"), default=64, show_default=True, help="Most images per request.")
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0, MAX_DRAIN_S),
    default=30.0,
    show_default=True,
    help="On SIGTERM / Ctrl-C: seconds running requests may take to finish before they are failed.",
)
@click.option(
    "--docs/--no-docs",
    default=True,
    show_default=True,
    help="Serve the OpenAPI document (/openapi.json: every request field, its type and limits) and /docs.",
)
@click.option(
    "--ui/--no-ui",
    default=True,
    show_default=True,
    help="Serve the playground page at / (pick a class, canvas and quality, see the brick plan, watch a job run).",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@click.version_option(package_name="lego-export", prog_name="lego-serve")
def main(
    host: str, port: int, ckpt: str | None, drain_timeout: float, docs: bool, ui: bool, log_level: str, **settings
) -> None:
    """Serve LEGO brick engines over HTTP, batching tiles of all requests in flight.

    \b
    lego-serve --engines engines/ --port 8000
    curl -s localhost:8000/v1/images -d '{"class": 7, "num": 8, "steps": 18}' -o grid.png
    curl -s localhost:8000/metrics

    SIGTERM or Ctrl-C drains running requests (--drain-timeout) and exits with status 0.
    """
    try:
        service = load_service(make_config(**settings), ckpt)
    except LegoError as e:
        raise click.ClickException(str(e)) from None
    serve(service, host, port, drain_timeout, log_level, docs=docs, ui=ui)


def make_config(
    *,
    engines: str = "engines",
    backend: str = "auto",
    precision: str = "fp32",
    threads: int = 0,
    streams: int = 1,
    max_batch_tiles: int = 0,
    max_active: int = 16,
    order: str = "slack",
    slo: str = "none",
    align: bool = True,
    calibrate: bool = True,
    max_queue: int = 64,
    max_resolution: int = 256,
    max_steps: int = 1000,
    max_images: int = 64,
):
    """The server's configuration, every setting range-checked (one-line LegoError naming it)."""
    from lego_export.serve.service import ServeConfig

    given = dict(threads=threads, streams=streams, max_batch_tiles=max_batch_tiles, max_active=max_active)
    given.update(max_queue=max_queue, max_resolution=max_resolution, max_steps=max_steps, max_images=max_images)
    for name, value in given.items():
        lo, hi = RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise LegoError(f"{name.replace('_', '-')} must be an integer from {lo} to {hi}, got {value!r}")
    if backend not in BACKENDS:
        raise LegoError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in COMPUTE_PRECISIONS:
        raise LegoError(f"precision must be one of {', '.join(COMPUTE_PRECISIONS)}, got {precision!r}")
    if order not in ORDERS:
        raise LegoError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if not align and order != "merge":  # the slack order never aligns: the option would change nothing
        raise LegoError(f"align applies to order merge only; order is {order!r}")
    from lego_export.serve.service import parse_slo

    parse_slo(slo)
    return ServeConfig(
        engines=engines,
        backend=backend,
        precision=precision,
        threads=threads,
        streams=streams,
        max_batch_tiles=max_batch_tiles,
        max_active=max_active,
        order=order,
        slo=slo,
        align=align,
        calibrate=calibrate,
        max_queue=max_queue,
        limits=Limits(max_resolution=max_resolution, max_steps=max_steps, max_images=max_images),
    )


def load_service(config, ckpt: str | None = None):
    """Read the manifest, check and load every engine, start the batcher."""
    from pathlib import Path

    from lego_export.manifest import Manifest
    from lego_export.runtime.backends import make_backend
    from lego_export.serve.service import ImageService

    manifest = Manifest.read(config.engines)
    backend = make_backend(
        config.backend,
        Path(config.engines),
        manifest,
        ckpt=ckpt,
        threads=config.threads,
        precision=config.precision,
    )
    return ImageService(config, backend=backend, manifest=manifest)


def serve(
    service,
    host: str,
    port: int,
    drain_timeout: float,
    log_level: str = "info",
    sockets=None,
    docs: bool = True,
    ui: bool = True,
) -> None:
    """Run uvicorn until SIGTERM / Ctrl-C, then drain: stop accepting, let running requests finish
    within drain_timeout, fail the rest, stop the batcher."""
    try:
        import uvicorn
    except ImportError:
        raise click.ClickException("lego-serve needs FastAPI and uvicorn: pip install 'lego-export[serve]'") from None

    from lego_export.serve.app import create_app

    closer = threading.Thread(target=service.close, args=(drain_timeout,), name="lego-drain", daemon=True)

    def drain() -> None:
        # After uvicorn stopped: the drain started at the signal (or now, if none came) must end.
        if not closer.is_alive() and not service.closed:
            closer.start()
        if closer.ident is not None:
            closer.join(drain_timeout + 10.0)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Refuse new work at once; running requests get drain_timeout seconds, then fail with
            # 503, so that every open connection has its answer before uvicorn closes it.
            service.stop_accepting()
            if not closer.is_alive() and not service.closed:
                closer.start()
            super().handle_exit(sig, frame)

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = uvicorn.Config(
        create_app(service, on_shutdown=drain, docs=docs, ui=ui),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(drain_timeout + 5.0),  # the drain's 503 answers still go out
        access_log=log_level == "debug",
    )
    server = DrainingServer(config)
    with exit_normally_after_signals(server):
        server.run(sockets=sockets)


@contextlib.contextmanager
def exit_normally_after_signals(server):
    """Exit status 0 after a graceful shutdown on SIGTERM or Ctrl-C.

    uvicorn handles SIGTERM / SIGINT while it runs and, once it has shut down, raises the same
    signal again with the previous handlers back in place: with the default ones the process then
    dies by SIGTERM (status -15, 143 in a shell) or, on Ctrl-C, click prints "Aborted!" and exits 1,
    although the drain went as designed. The handlers installed here stand in as "previous": they
    hand a signal to the server (a signal that comes before uvicorn listens still stops it cleanly),
    so the re-raised one ends nothing and lego-serve returns normally."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; uvicorn does not install handlers either
        return
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
