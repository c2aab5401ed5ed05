"""Which cores an engine runtime's own threads are pinned to, and the ones it leaves to its caller.

ONNX Runtime, with its default thread count, starts one worker per physical core but the first and
pins each worker to its core; the thread that calls ``run`` works beside them, unpinned. A server
calls the engines from a different thread for each request in flight, and the scheduler often
wakes such a thread on a core whose pinned worker is about to need it: both then share one core
until the kernel moves the caller, and the calls after a change of calling thread run slow. A
calling thread kept to the cores the runtime left to it never meets its workers.

Linux only (``/proc/self/task``); elsewhere nothing is pinned.
"""

from __future__ import annotations

import os
from pathlib import Path

TASKS = Path("/proc/self/task")


def thread_cpus() -> dict[int, frozenset[int]]:
    """The CPUs each thread of this process may run on, by thread id ({} where unknown)."""
    if not TASKS.is_dir():
        return {}
    found = {}
    for task in TASKS.iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended while we looked
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task.name)] = parse_cpu_list(line.split(":", 1)[1])
    return found


def parse_cpu_list(text: str) -> frozenset[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6} (the kernel's list format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def cores_left_to_caller(before: dict[int, frozenset[int]]) -> frozenset[int] | None:
    """The process's CPUs that no thread started since `before` (thread_cpus() then) is pinned to:
    where the thread calling the engines runs beside their pinned workers, not on top of them.
    None when no new thread is pinned (nothing to keep off), or when they hold every CPU."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = frozenset(os.sched_getaffinity(0))
    pinned = [cpus for tid, cpus in thread_cpus().items() if tid not in before and cpus < allowed]
    if not pinned:
        return None
    return allowed.difference(*pinned) or None


def pin_this_thread(cpus: frozenset[int] | None) -> None:
    """Keep the calling thread to cpus from now on (None: leave it where it may run)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)  # 0: the calling thread (Linux sets affinity per thread)
        except OSError:  # the process was moved off those CPUs since: a placement hint, not a must
            pass
