"""Stopping a run cleanly when the cluster asks: SIGTERM (SLURM, Kubernetes, torchrun before they kill), SIGUSR1
(SLURM's `--signal`), SIGINT (Ctrl-C).

The handler only records the signal (no I/O: PyTorch Lightning moved its checkpoint writing out of the handler for
that reason); the training loop asks at step boundaries, writes a checkpoint and stops. With several ranks the
signal may reach some of them only, so the ranks agree first: every `poll` steps an all-reduce (MAX) over a tiny
tensor on a gloo group carries "stop" and "a checkpoint is due" (a due-by-time decision is rank 0's clock), so every
rank stops, or saves, at the same step. One process asks every step, and needs no collective.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
POLL = 10  # steps between two agreements of several ranks: a stop comes at most this many steps late


class Preemption:
    """Installs the handlers (main thread only) until `close()`; `received` is the first signal's number."""

    def __init__(self, signals=SIGNALS):
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum  # a second signal while the checkpoint is written changes nothing

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Agreement:
    """What the ranks decide together at a step boundary: stop (a signal reached any rank) and save (a checkpoint is
    due by rank 0's clock). `world_size` 1: every step, no collective."""

    def __init__(self, world_size: int, poll: int = POLL):
        self.world_size, self.poll = world_size, poll
        self.group = None
        if world_size > 1:  # a CPU group beside NCCL's: agreeing costs no device sync
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def asks(self, step: int) -> bool:
        return self.world_size == 1 or step % self.poll == 0

    def decide(self, stop: bool, save: bool) -> tuple[bool, bool]:
        if self.world_size == 1:
            return stop, save
        flags = torch.tensor([int(stop), int(save)], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flags[0]), bool(flags[1])
