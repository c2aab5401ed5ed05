"""What every command-line tool shares: help layout and one-line errors (click only, no torch)."""

from __future__ import annotations

import functools

import click

from lego_export.errors import LegoError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def one_line_errors(interrupted: str = "interrupted; nothing partial was left behind"):
    """Turn LegoError and Ctrl-C into a one-line message and a non-zero exit, never a traceback."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except LegoError as e:
                raise click.ClickException(str(e)) from None
            except KeyboardInterrupt:
                raise click.ClickException(interrupted) from None

        return wrapper

    return decorate
