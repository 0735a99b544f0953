"""`qwen2 serve --tensor-parallel-size N`: one server, N ranks (docs/distributed.md).

Alone, the command makes itself rank 0 of an N-rank group on this machine and starts ranks 1..N-1
(the same command line); under torchrun (across machines) every rank is already in the group.
Rank 0 serves HTTP; the others load their share of the model and follow rank 0's engine steps
(qwen2.engine.lockstep). A rank that dies takes the server down with an error: rank 0's next
collective fails, its engine fails every request, and the server stops.
"""
from __future__ import annotations

import os
import sys
import threading

from qwen2.engine.lockstep import Lockstep, LockstepError, follow
from qwen2.errors import Qwen2Error
from qwen2.model.tp import init_from_env, spawn_local_ranks, tp_rank_world


class Ranks:
    """This process's place in the group: `rank`, the rank processes it started, and the fatal
    error that stopped the group (None while all is well)."""

    def __init__(self, args):
        n = args.tensor_parallel_size
        if n < 1:
            raise Qwen2Error(f"--tensor-parallel-size must be >= 1, not {n}")
        self.started: list = []
        self.error: str | None = None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # launched by torchrun (qwen2.cli joined the group already)
            if n not in (1, world):
                raise Qwen2Error(f"launched as {world} ranks but --tensor-parallel-size is {n}")
        elif n > 1:
            self.started = spawn_local_ranks(n, sys.argv[1:])
            try:
                init_from_env(args.device)
            except BaseException:
                self.reap(0)
                raise
        tp = tp_rank_world()
        self.rank, self.world = tp if tp is not None else (0, 1)

    def lockstep(self, on_fatal) -> Lockstep | None:
        if self.world == 1:
            return None

        def fatal(message: str):
            self.error = message
            on_fatal(message)
        return Lockstep(on_fatal=fatal)

    def follow(self, engine) -> int:
        """Ranks other than 0: take rank 0's steps until it stops. Ctrl-C in the terminal reaches
        every rank; only rank 0 acts on it (its stop message ends the others)."""
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            follow(engine)
        except LockstepError as e:
            raise Qwen2Error(str(e)) from None
        return 0

    def reap(self, timeout: float = 30.0):
        """Rank 0, after serving: wait for the ranks it started (they exit on the stop message),
        then make sure none outlives it."""
        timer = threading.Timer(timeout, lambda: [p.kill() for p in self.started if p.poll() is None])
        timer.daemon = True
        timer.start()
        for p in self.started:
            p.wait()
        timer.cancel()
