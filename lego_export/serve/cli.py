"""lego-serve: an HTTP server that batches the brick tiles of every request in flight. Its options
are ServeConfig's fields (config.py) and the process's own: host, port, log level."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator

import click

from lego_export.cli_common import CONTEXT
from lego_export.errors import LegoError
from lego_export.options import OptionError
from lego_export.serve.config import ServeConfig, config_fields

DRAIN_GRACE_S = 5.0  # beyond --drain-timeout: the cancelled jobs' 503 answers still go out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_options(command: Callable) -> Callable:
    """Decorate a click command with one option per ServeConfig field."""
    for f in reversed(config_fields()):
        meta, default = f.metadata, f.default
        kind: click.ParamType | None = None  # str
        if meta["choices"]:
            kind = click.Choice(meta["choices"])
        elif meta["range"] and isinstance(default, int):
            kind = click.IntRange(*meta["range"])
        elif meta["range"]:
            kind = click.FloatRange(*meta["range"])
        declaration = f"{flag(f.name)}/--no-{f.name.replace('_', '-')}" if isinstance(default, bool) else flag(f.name)
        command = click.option(
            declaration, f.name, default=default, type=kind, show_default=default is not None, help=meta["help"]
        )(command)  # fmt: skip
    return command


@click.command(context_settings=CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@config_options
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@click.version_option(package_name="lego-export", prog_name="lego-serve")
def main(host: str, port: int, log_level: str, **settings) -> None:
    """Serve LEGO brick engines over HTTP, batching tiles of all requests in flight.

    \b
    lego-serve --engines engines/ --port 8000
    curl -s localhost:8000/v1/images -d '{"class": 7, "num": 8, "steps": 18}' -o grid.png
    curl -s localhost:8000/metrics

    SIGTERM or Ctrl-C drains running requests (--drain-timeout) and exits with status 0.
    """
    try:
        service = load_service(make_config(**settings))
    except LegoError as e:
        raise click.ClickException(str(e)) from None
    serve(service, host, port, log_level)


def make_config(**settings) -> ServeConfig:
    """A checked ServeConfig; an error names the setting by its flag."""
    with named_by_flag():
        return ServeConfig(**settings).check()


def load_service(config: ServeConfig):
    """Read the manifest, check and load every engine, start the batcher."""
    from lego_export.serve.service import ImageService

    with named_by_flag():
        return ImageService(config)


@contextlib.contextmanager
def named_by_flag() -> Iterator[None]:
    """An OptionError about a setting, as lego-serve names it: by its flag."""
    try:
        yield
    except OptionError as e:
        raise e.renamed({f.name: flag(f.name) for f in config_fields()}) from None


def serve(service, host: str, port: int, log_level: str = "info", sockets=None) -> None:
    """Run uvicorn until SIGTERM / Ctrl-C, then drain: stop accepting, let running requests finish
    within the config's drain_timeout, fail the rest, stop the batcher."""
    try:
        import uvicorn
    except ImportError:
        raise click.ClickException("lego-serve needs FastAPI and uvicorn: pip install 'lego-export[serve]'") from None

    from lego_export.serve.app import create_app

    drain_timeout = service.config.drain_timeout
    closer = threading.Thread(target=service.close, args=(drain_timeout,), name="lego-drain", daemon=True)

    def drain() -> None:  # uvicorn has stopped: the drain the signal started (or one started now) must end
        if not closer.is_alive() and not service.closed:
            closer.start()
        if closer.ident is not None:
            closer.join(drain_timeout + DRAIN_GRACE_S)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # New work is refused at once and running requests get drain_timeout seconds (then a
            # 503), so every open connection has its answer before uvicorn closes it.
            service.stop_accepting()
            if not closer.is_alive() and not service.closed:
                closer.start()
            super().handle_exit(sig, frame)

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = uvicorn.Config(
        create_app(service, on_shutdown=drain),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(drain_timeout + DRAIN_GRACE_S),
        access_log=log_level == "debug",
    )
    server = DrainingServer(config)
    with exit_normally_after_signals(server):
        server.run(sockets=sockets)


@contextlib.contextmanager
def exit_normally_after_signals(server):
    """Exit status 0 after a drain on SIGTERM or Ctrl-C.

    Once shut down, uvicorn raises the signal again under the handlers it found, and the default ones
    would end the process by SIGTERM (status 143) or, on Ctrl-C, make click exit 1 with "Aborted!".
    These handlers stand in for them: they hand a signal to the server (so one that comes before
    uvicorn listens still stops it cleanly), and the raised-again one ends nothing."""
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
