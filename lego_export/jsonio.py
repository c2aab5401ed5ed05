"""JSON from elsewhere (manifests, tuned settings, request bodies): bounded and strict.

The standard library accepts NaN and Infinity and recurses once per nesting level; files and
bodies from elsewhere get neither: non-finite literals are refused, nesting is bounded, and a file
is read only if it is a regular file no larger than the caller's limit.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from lego_export.errors import LegoError

MAX_DEPTH = 64  # a manifest nests about 6 deep; far more is not one


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping once past limit (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads_strict(text: str | bytes, max_depth: int = MAX_DEPTH):
    """json.loads that refuses NaN, Infinity and nesting deeper than max_depth, with a ValueError."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    if _depth(value, max_depth) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


def read_regular_file(path: Path, max_bytes: int, name: str) -> bytes:
    """The bytes of a regular file of at most max_bytes. Opened without blocking and checked on the
    open descriptor, so a FIFO, device or directory put in a file's place is refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise LegoError(f"{name}: no such file") from None
    except OSError as e:
        raise LegoError(f"{name}: cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LegoError(f"{name} is not a regular file")
        if info.st_size > max_bytes:
            raise LegoError(f"{name} is larger than {max_bytes:,} bytes")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LegoError(f"{name} is larger than {max_bytes:,} bytes")
    return data


def read_json(path: Path, max_bytes: int, name: str, what: str):
    """A JSON file from elsewhere, read as in read_regular_file and parsed as in loads_strict; one-line
    LegoError naming the file as `name`."""
    data = read_regular_file(Path(path), max_bytes, name)
    try:
        return loads_strict(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise LegoError(f"{name} is not valid JSON for a {what} ({e})") from None
