"""Preemption: how a scheduler stops a run so that the same command continues it.

SIGTERM (how SLURM, Kubernetes and torchrun's agent stop a job) and SIGUSR1 (which SLURM can send
ahead of a time limit, ``--signal=USR1@120``) do not end the process: they ask the loop to stop at
its next host read of the losses (every ``log_every`` steps; under torchrun the processes agree on
the step), save a checkpoint there, mid-epoch if need be, and raise :class:`Preempted`; the command
line then exits with :data:`EXIT_REQUEUE`. ``train --resume auto`` run again continues from that
step, with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import signal

import torch

from ..distributed import Dist, all_reduce_sum

#: "Requeue me": EX_TEMPFAIL of sysexits.h (a temporary failure; the same command may succeed later).
EXIT_REQUEUE = 75
SIGNALS = ("SIGTERM", "SIGUSR1")
_received: list[str] = []


class Preempted(Exception):
    """A stop signal arrived; the run saved a checkpoint at ``step`` and stopped."""

    def __init__(self, signal_name: str, step: int, total: int):
        super().__init__(f"stopped by {signal_name} at step {step} of {total}, checkpoint saved")
        self.signal_name, self.step, self.total = signal_name, step, total


def _on_signal(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install() -> None:
    """Make SIGTERM and SIGUSR1 stop requests (the command line's ``train``; main thread only)."""
    for name in SIGNALS:
        signal.signal(getattr(signal, name), _on_signal)


def requested() -> str | None:
    """The name of the first stop signal received by this process, or None."""
    return _received[0] if _received else None


def agreed(dist: Dist, device: torch.device) -> bool:
    """Whether any process of the run received a stop signal; every process gets the same answer
    (one small all-reduce), so they stop at the same step."""
    local = requested() is not None
    if not dist.on:
        return local
    return bool(all_reduce_sum(torch.tensor([float(local)], device=device), dist).item() > 0)


def clear() -> None:
    _received.clear()
