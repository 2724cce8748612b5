"""How many CPU threads a run uses by default: the cores that are idle now, at least one.

What. `default_threads()` = clamp(cores - round(1-minute load average), 1, cores); `OMP_NUM_THREADS`, when the
user set it, wins. Pretraining applies it on CPU when `--threads 0` (the default).

Why. torch's own default is one thread per core. OpenMP's worker threads wait for each other at every parallel
region; when another process holds a core, one worker is descheduled and every region waits for it, so a
two-thread step can be many times slower than one thread (measured here at more than 20x, BENCHMARKS.md). Using
only the cores nobody else is using keeps the full speed of an idle machine and never oversubscribes a busy one
(`benchmarks/threads.py` measures 1 thread, all cores, all cores with a passive wait policy, and this default).

Rejected: always one thread (halves a dedicated multi-core machine); OMP_WAIT_POLICY=PASSIVE set by the library
(OpenMP reads it only when torch loads, before nanoseek could set it, and it does not remove the wait for a
descheduled worker).
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
