"""Stopping a run cleanly when the cluster asks: SIGTERM (SLURM, Kubernetes, torchrun before they kill), SIGUSR1
(SLURM's `--signal`), SIGINT (Ctrl-C).

Before the first training step (a pull, indexing, the cache fill, a compile try: minutes, with nothing to save) a
signal stops the run at once: the handler raises `Interrupted`, which unwinds like any error (temporary files are
removed on the way, the folder's lock released) and the command exits 128 + the signal. From the loop's start
(`defer()`) the handler only records the signal (no I/O: PyTorch Lightning moved its checkpoint writing out of the
handler for that reason); the training loop asks at step boundaries, writes a checkpoint and stops. With several
ranks the signal may reach some of them only, so the ranks agree first: every `poll` steps an all-reduce (MAX) over
a tiny tensor on a gloo group carries "stop" and "a checkpoint is due" (a due-by-time decision is rank 0's clock),
so every rank stops, or saves, at the same step. One process asks every step, and needs no collective.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
POLL = 10  # steps between two agreements of several ranks: a stop comes at most this many steps late


class Interrupted(BaseException):
    """A signal before the first training step. A BaseException, as KeyboardInterrupt is: no `except Exception` on
    the way (a compile try's fallback, a retrying download) takes it for a failure to work around."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.name = signum, signal.Signals(signum).name


class Preemption:
    """Installs the handlers (main thread only) until `close()`; `received` is the first signal's number. Until
    `defer()` a signal raises Interrupted where the main thread is."""

    def __init__(self, signals=SIGNALS):
        self.received: int | None = None
        self.immediate, self._pid = True, os.getpid()
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def defer(self) -> None:
        """From now on a signal is recorded and acted on at a step boundary (the loop has begun)."""
        self.immediate = False
        if self.received is not None:  # came between the last check and here
            raise Interrupted(self.received)

    def _handle(self, signum, frame) -> None:
        # a loader worker forked with this handler only records: Ctrl-C reaches the whole process group, and the
        # main process decides
        if self.immediate and os.getpid() == self._pid:
            self.received = signum
            raise Interrupted(signum)
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
