"""``--backend auto`` on a CPU: the faster of the installed CPU runtimes, measured on this machine.

Which of OpenVINO and ONNX Runtime runs this project's bricks faster depends on the CPU (its vector
units, core count, caches) and on the runtime versions, and the two are often within a few percent of
each other. So on first use ``auto`` times the model's own full chain on each runtime, each in its own
process (two runtimes' thread pools in one process slow each other), in alternating rounds with the
runtime not being timed stopped (SIGSTOP, where the OS has it), at batch 16 and batch 1, and takes the
runtime with the smaller product of the two medians (each batch counts alike). The processes end
before the choice is returned, and their thread pools with them.

The result is cached in a small JSON file, one entry per (CPU model and core count, the model's
engine files, the runtime versions, precision, threads, streams): ``$LEGO_EXPORT_AUTO_CACHE`` if set,
else ``$XDG_CACHE_HOME/lego-export/backend-choice.json`` (``~/.cache`` without XDG_CACHE_HOME). The
file is read as untrusted input: a file that is not this format, or an entry whose numbers do not
check out, is ignored (and measured again). ``LEGO_EXPORT_AUTO_MEASURE=0`` turns the measurement off:
``auto`` then takes OpenVINO when installed, else ONNX Runtime, without starting any process.

    python -m lego_export.runtime.autoselect ENGINES [--precision P] [--threads T]   # what auto picks, and why
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from lego_export.manifest import Manifest

CACHE_ENV = "LEGO_EXPORT_AUTO_CACHE"
MEASURE_ENV = "LEGO_EXPORT_AUTO_MEASURE"
CACHE_FILE = "backend-choice.json"
FORMAT = 1
# In preference order: the one taken when nothing is measured (measurement off, or it failed).
CPU_RUNTIMES = ("openvino", "onnxruntime")
BATCHES = (16, 1)  # lego-run's default batch, and one image (a server's smallest call)
ROUNDS = 3  # alternating rounds, so that drift on the machine hits every runtime alike
CALLS = 3  # timed full chains per batch per round
WARMUP = 2  # untimed full chains per batch, once
TIMEOUT_S = 120.0  # the whole measurement, loading included; past it the processes are killed
MAX_ENTRIES = 64  # the cache keeps the most recent entries only
MAX_BYTES = 1 << 20
MAX_MS = 1e7


@dataclass(frozen=True)
class Choice:
    """The runtime auto takes and the one-line reason (Backend.choice)."""

    backend: str
    reason: str


class MeasureError(Exception):
    """The measurement could not finish (a runtime's process failed, or it took too long)."""


def cache_path() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "lego-export" / CACHE_FILE


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# The distributions that install each runtime's module (the CPU, GPU and vendor builds).
DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "openvino": ("openvino", "openvino-nightly"),
}


def runtime_version(module: str) -> str:
    """The installed runtime's distribution and version, without importing it (else where it lives)."""
    for dist in DISTRIBUTIONS.get(module, (module,)):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{dist} {importlib.metadata.version(dist)}"
    spec = importlib.util.find_spec(module)
    return f"unknown version at {spec.origin}" if spec is not None else "not installed"


def model_digest(manifest: Manifest) -> str:
    """The engine files' sha256s: the same graphs in another folder are the same model."""
    files = sorted((e.name, fmt, f.sha256) for e in manifest.engines for fmt, f in e.files.items())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def cache_key(manifest: Manifest, candidates: Sequence[str], precision: str, threads: int, streams: int) -> str:
    fields = {
        "format": FORMAT,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "arch": platform.machine(),
        "model": model_digest(manifest),
        "runtimes": {name: runtime_version(name) for name in sorted(candidates)},
        "precision": precision,
        "threads": threads,
        "streams": streams,
        "batches": list(BATCHES),
        "rounds": [ROUNDS, CALLS],
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# -- the cache file ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    backend: str
    ms: dict[str, dict[str, float]]
    measured: datetime


def _valid_entry(entry: object) -> Entry | None:
    """An entry as written by store(), with its numbers checked; None for anything else."""
    if not isinstance(entry, dict) or set(entry) != {"backend", "ms", "measured"}:
        return None
    ms, measured = entry["ms"], entry["measured"]
    if not isinstance(ms, dict) or not 2 <= len(ms) <= len(CPU_RUNTIMES) or not set(ms) <= set(CPU_RUNTIMES):
        return None
    for per_batch in ms.values():
        if not isinstance(per_batch, dict) or set(per_batch) != {str(b) for b in BATCHES}:
            return None
        for v in per_batch.values():
            if isinstance(v, bool) or not isinstance(v, int | float) or not (0 < v < MAX_MS) or not math.isfinite(v):
                return None
    if entry["backend"] != fastest(ms) or not isinstance(measured, str) or len(measured) > 40:
        return None
    try:
        when = datetime.fromisoformat(measured)
    except ValueError:
        return None
    return Entry(fastest(ms), ms, when)


def read_cache(path: Path) -> dict[str, dict]:
    """The file's entries by key, each checked; {} for a missing, oversized or malformed file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError:
        return {}
    if len(data) > MAX_BYTES:
        return {}
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), dict):
        return {}
    return {
        k: doc["entries"][k]
        for k in doc["entries"]
        if isinstance(k, str) and len(k) == 64 and _valid_entry(doc["entries"][k]) is not None
    }


def store(path: Path, key: str, entry: dict) -> None:
    """Add an entry to the file (re-read first: another process may have added its own)."""
    from lego_export.atomic import atomic_write

    entries = read_cache(path)
    entries.pop(key, None)
    entries[key] = entry
    kept = dict(list(entries.items())[-MAX_ENTRIES:])  # insertion order: oldest first
    text = json.dumps({"format": FORMAT, "entries": kept}, indent=1, sort_keys=False)
    with atomic_write(path) as f:
        f.write(text.encode())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process measures at a time (torchrun's ranks, several servers starting): the others wait
    and then find its entry. Without fcntl, or where the lock file cannot be made, no lock."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- choosing ------------------------------------------------------------------------------------------


def fastest(ms: dict[str, dict[str, float]]) -> str:
    """The runtime with the smallest product of its per-batch medians (ties: preference order)."""
    order = {name: i for i, name in enumerate(CPU_RUNTIMES)}
    return min(ms, key=lambda n: (math.prod(ms[n].values()), order.get(n, len(order))))


def describe(ms: dict[str, dict[str, float]], measured: datetime, where: str) -> str:
    winner = fastest(ms)
    others = [n for n in ms if n != winner]
    b0 = str(BATCHES[0])
    text = f"{winner}: {ms[winner][b0]:.1f} ms" + "".join(f" vs {n} {ms[n][b0]:.1f} ms" for n in others)
    text += f" per full chain at batch {b0}"
    for b in BATCHES[1:]:
        text += f" ({ms[winner][str(b)]:.1f}" + "".join(f" vs {ms[n][str(b)]:.1f}" for n in others)
        text += f" ms at batch {b})"
    return f"{text}; measured {measured.strftime('%Y-%m-%d %H:%M UTC')}, {where}"


def installed(candidates: Sequence[str] = CPU_RUNTIMES) -> list[str]:
    return [n for n in candidates if importlib.util.find_spec(n) is not None]


def choose(
    folder: Path, manifest: Manifest, candidates: Sequence[str], precision: str = "fp32", threads: int = 0,
    streams: int = 1,
) -> Choice:  # fmt: skip
    """The CPU runtime auto takes among candidates (installed, in preference order), and why."""
    if not candidates:
        raise ValueError("no candidate runtime")
    if len(candidates) == 1:
        return Choice(candidates[0], f"{candidates[0]}: the only CPU runtime installed here for {precision}")
    if os.environ.get(MEASURE_ENV, "1").strip() == "0":
        return Choice(candidates[0], f"{candidates[0]}: preferred when installed ({MEASURE_ENV}=0: not measured)")
    path = cache_path()
    key = cache_key(manifest, candidates, precision, threads, streams)
    with _locked(path):
        hit = _valid_entry(read_cache(path).get(key))
        if hit is not None and set(hit.ms) == set(candidates):
            return Choice(hit.backend, describe(hit.ms, hit.measured, f"cached in {path}"))
        try:
            ms = measure(folder, candidates, precision, threads, streams)
        except MeasureError as e:
            return Choice(candidates[0], f"{candidates[0]}: preferred when installed (measuring failed: {e})")
        now = datetime.now(timezone.utc).replace(microsecond=0)
        winner = fastest(ms)
        try:
            store(path, key, {"backend": winner, "ms": ms, "measured": now.isoformat()})
            where = f"cached in {path}"
        except Exception as e:  # an unwritable cache costs a measurement next time, nothing more
            where = f"not cached ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return Choice(winner, describe(ms, now, where))


# -- measuring -----------------------------------------------------------------------------------------


def measure(
    folder: Path, candidates: Sequence[str], precision: str, threads: int, streams: int, timeout: float = TIMEOUT_S
) -> dict[str, dict[str, float]]:
    """Median milliseconds per full chain, by runtime and batch, each runtime in its own process."""
    import numpy as np

    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, IO[bytes]] = {}
    timed_out = threading.Event()

    def kill_all() -> None:
        timed_out.set()
        for p in procs.values():
            with contextlib.suppress(OSError):
                p.kill()

    watchdog = threading.Timer(timeout, kill_all)
    watchdog.daemon = True
    times: dict[str, dict[str, list[float]]] = {n: {str(b): [] for b in BATCHES} for n in candidates}
    try:
        watchdog.start()
        env = {**os.environ, MEASURE_ENV: "0"}
        spec = {"folder": str(folder), "precision": precision, "threads": threads, "streams": streams}
        for name in candidates:  # they load side by side; none is timed until all are ready
            logs[name] = tempfile.TemporaryFile()
            cmd = [sys.executable, "-m", __name__, "--worker", json.dumps({**spec, "backend": name})]
            procs[name] = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[name], text=True, env=env
            )
        for name, p in procs.items():
            _answer(name, p, logs[name], timed_out, timeout)
            _pause(p)
        for r in range(ROUNDS):
            for name in candidates if r % 2 == 0 else candidates[::-1]:
                p = procs[name]
                _resume(p)
                p.stdin.write("run\n")
                p.stdin.flush()
                answer = _answer(name, p, logs[name], timed_out, timeout)
                _pause(p)
                for b in times[name]:
                    times[name][b] += [float(t) for t in answer[b]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MeasureError(f"{type(e).__name__}: {e}") from None
    finally:
        watchdog.cancel()
        _end(procs)
        for f in logs.values():
            f.close()
    return {n: {b: float(np.median(t)) for b, t in per.items()} for n, per in times.items()}


def _answer(name: str, p: subprocess.Popen, log: IO[bytes], timed_out: threading.Event, limit: float) -> dict:
    """The worker's next JSON line (other lines a runtime may print are skipped)."""
    while True:
        line = p.stdout.readline()
        if not line:
            if timed_out.is_set():
                raise MeasureError(f"took over {limit:g} s")
            p.wait()
            log.seek(0)
            tail = [s for s in log.read().decode(errors="replace").splitlines() if s.strip()]
            raise MeasureError(f"{name} exited {p.returncode}" + (f": {tail[-1][:200]}" if tail else ""))
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and "lego-autoselect" in doc:
                return doc["lego-autoselect"]


def _pause(p: subprocess.Popen) -> None:
    if hasattr(signal, "SIGSTOP"):
        with contextlib.suppress(OSError):
            os.kill(p.pid, signal.SIGSTOP)


def _resume(p: subprocess.Popen) -> None:
    if hasattr(signal, "SIGCONT"):
        with contextlib.suppress(OSError):
            os.kill(p.pid, signal.SIGCONT)


def _end(procs: dict[str, subprocess.Popen]) -> None:
    """Every worker gone and reaped: stdin closed (it returns), killed if it has not within 10 s."""
    for p in procs.values():
        _resume(p)
        with contextlib.suppress(OSError, ValueError):
            p.stdin.close()
    for p in procs.values():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        with contextlib.suppress(OSError, ValueError):
            p.stdout.close()


def _worker(spec: dict) -> None:
    """Load one runtime, warm it up, then answer each 'run' line with the call times (ms) per batch."""
    import numpy as np

    from lego_export.plan import StepPlan
    from lego_export.runtime.backends import make_backend
    from lego_export.runtime.pipeline import LegoPipeline

    folder = Path(spec["folder"])
    manifest = Manifest.read(folder)
    backend = make_backend(
        spec["backend"], folder, manifest, threads=spec["threads"], precision=spec["precision"],
        streams=spec["streams"],
    )  # fmt: skip
    pipe = LegoPipeline(manifest, backend)
    cfg = manifest.model
    full = StepPlan(0, 1.0, len(cfg.bricks), (0, 0))
    rng = np.random.default_rng(0)
    chains = {}
    for b in BATCHES:
        x = rng.standard_normal((b, cfg.img_channels, cfg.img_resolution, cfg.img_resolution)).astype(np.float32)
        onehot = np.eye(cfg.num_classes, dtype=np.float32)[np.arange(b) % cfg.num_classes] if cfg.num_classes else None
        chains[str(b)] = (x, onehot)
    for x, onehot in chains.values():
        for _ in range(WARMUP):
            pipe.denoise(x, 1.0, full, onehot)

    def say(doc: object) -> None:
        sys.stdout.write(json.dumps({"lego-autoselect": doc}) + "\n")
        sys.stdout.flush()

    say({"ready": spec["backend"]})
    for _line in sys.stdin:
        out = {}
        for batch, (x, onehot) in chains.items():
            took = []
            for _ in range(CALLS):
                start = time.perf_counter()
                pipe.denoise(x, 1.0, full, onehot)
                took.append((time.perf_counter() - start) * 1e3)
            out[batch] = took
        say(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(json.loads(argv[1]))
        return
    import click

    from lego_export.runtime.backends import make_backend

    @click.command()
    @click.argument("engines", type=click.Path(exists=True, file_okay=False))
    @click.option("--precision", default="fp32", show_default=True)
    @click.option("--threads", default=0, show_default=True)
    def cli(engines: str, precision: str, threads: int) -> None:
        """Print the runtime --backend auto takes for ENGINES on this machine, and why."""
        folder = Path(engines)
        backend = make_backend("auto", folder, Manifest.read(folder), threads=threads, precision=precision)
        click.echo(backend.choice)

    cli.main(args=argv, prog_name="python -m lego_export.runtime.autoselect")


if __name__ == "__main__":
    main()
