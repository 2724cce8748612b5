"""Fault injection through the run loop's own seams, for tests (nothing in nanoseek reads a test switch).

In-process: `nan_at(monkeypatch, step)` makes that optimizer step's loss NaN (it wraps `loop.forward_backward`).
In a subprocess (kill tests): `python tests/train/faults.py --slow-save SECONDS <nanoseek command and flags>` runs
the CLI with `state.write_trainer_state` slowed down, so a SIGKILL can land inside a checkpoint write (before
its atomic rename). torchrun runs the script the same way.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from nanoseek.cli import main
from nanoseek.train import loop, state


def nan_at(monkeypatch, step: int) -> None:
    """Optimizer step `step` (1-based; counted in micro-batches, the tests use grad_accum=1) has a NaN loss."""
    real, calls = loop.forward_backward, [0]

    def forward_backward(run, x, y, weight):
        calls[0] += 1
        if calls[0] == step:
            inner = run.wrapped

            def poisoned(*args, **kwargs):
                out = inner(*args, **kwargs)
                out.main_loss, out.loss = out.main_loss * float("nan"), out.loss * float("nan")
                return out

            run = dataclasses.replace(run, wrapped=poisoned)
        return real(run, x, y, weight)

    monkeypatch.setattr(loop, "forward_backward", forward_backward)


def slow_save(seconds: float) -> None:
    """Every checkpoint write sleeps `seconds` after writing trainer_state/, before the directory is renamed."""
    real = state.write_trainer_state

    def write_trainer_state(*args, **kwargs):
        real(*args, **kwargs)
        time.sleep(seconds)

    state.write_trainer_state = write_trainer_state


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--slow-save"]:
        slow_save(float(argv[1]))
        argv = argv[2:]
    raise SystemExit(main(argv))
