"""What every command-line tool shares: help layout and one-line errors (click only, no torch)."""

from __future__ import annotations

import functools
import signal
import threading

import click

from lego_export.errors import LegoError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


_signalled = threading.Event()


def _terminate(signum, frame):
    # Noted as well as raised: native code (OpenVINO's bindings, seen here) can swallow the
    # exception, and a long loop then ends the run anyway at its next check_interrupted().
    _signalled.set()
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: temporary files and staging folders go


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if SIGINT or SIGTERM came (call it once per step of long work)."""
    if _signalled.is_set():
        raise KeyboardInterrupt


def one_line_errors(interrupted: str = "interrupted; nothing partial was left behind"):
    """Turn LegoError, Ctrl-C and SIGTERM into a one-line message and exit status 1, never a traceback.

    (Usage errors that click itself detects, such as an unknown option, exit with status 2.)
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            in_main = threading.current_thread() is threading.main_thread()
            previous = {}
            if in_main:
                _signalled.clear()
                previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                return fn(*args, **kwargs)
            except LegoError as e:
                raise click.ClickException(str(e)) from None
            except OSError as e:
                if e.filename is None:
                    raise
                # a path the system refused (a pseudo, read-only or full file system): one line naming it
                raise click.ClickException(f"{e.filename}: {e.strerror or e}") from None
            except KeyboardInterrupt:
                raise click.ClickException(interrupted) from None
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        return wrapper

    return decorate
