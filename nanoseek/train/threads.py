"""How many CPU threads a run uses by default: the cores that are idle now, at least one.

What. `default_threads()` = clamp(cores - round(1-minute load average), 1, cores); `OMP_NUM_THREADS`, when the
user set it, wins. Pretraining applies it on CPU when `--threads 0` (the default).

Why. torch's own default is one thread per core. OpenMP's worker threads wait for each other at every parallel
region, by default spinning; when other processes hold the cores, the spinning workers steal time from the one
doing work, so a two-thread step can be many times slower than one thread (4.6-5.5x measured by
`benchmarks/threads.py` on the shared 2-core machine, more than 20x in an earlier run, BENCHMARKS.md). Using only
the cores nobody else is using keeps the full speed of an idle machine and never oversubscribes a busy one.
nanoseek also sets OMP_WAIT_POLICY=PASSIVE before torch loads (nanoseek/__init__.py): with it, even all cores
on the busy machine were 1.2-1.3x faster than one thread, but it only works if nanoseek is imported before torch,
so the thread count stays the safe one.

Rejected: always one thread (halves a dedicated multi-core machine); all cores with PASSIVE alone (a script that
imports torch first gets spinning workers and the 5x slowdown).
"""

from __future__ import annotations

import os


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """The number of torch CPU threads to use: OMP_NUM_THREADS if set, else the idle cores (>= 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if cores is None and load is None and env.isdigit() and int(env) > 0:
        return int(env)
    cores = cores or os.cpu_count() or 1
    load = os.getloadavg()[0] if load is None else load
    return max(1, min(cores, cores - round(load)))
