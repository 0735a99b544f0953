"""Tensor-parallel serving: the engines of all ranks take the same steps.

Rank 0 runs the HTTP server and the engine as usual. At every step boundary (Engine._drain) it
broadcasts what came in since the last one: new requests (id, prompt, sampling parameters, group,
scoring start) and aborts. The other ranks (`follow`) add exactly those to their own engine, then
run the same step. Scheduling depends only on that input and on the logits, which every rank
computes alike (qwen2.model.tp gathers them), and sampling draws from generators seeded alike,
so every rank's engine makes the same decisions and their collectives pair up.

When rank 0 idles it still steps (and broadcasts nothing) twice a second, so the others never wait
on a collective long enough to time out. A collective that fails (a rank died) is fatal: the
engine fails every request with an error and `on_fatal` stops the server; a rank that loses rank 0
exits with an error. Broadcast objects are pickled by torch.distributed, between this server's own
ranks only.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch.distributed as dist

log = logging.getLogger("qwen2.engine")

STOP = "stop"


class LockstepError(RuntimeError):
    """A collective between the ranks failed: a rank is gone."""


class Lockstep:
    def __init__(self, on_fatal: Callable[[str], None] | None = None):
        self.rank = dist.get_rank()
        self.on_fatal = on_fatal
        self.stopped = False

    def _broadcast(self, obj):
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0)
        except Exception as e:  # gloo / NCCL errors when a peer is gone
            raise LockstepError(f"tensor-parallel rank lost ({type(e).__name__}: {e})") from None
        return box[0]

    def exchange(self, engine, new: list, aborted: set) -> tuple[list, set]:
        """Rank 0: send what this step takes in; the others: receive it and make the same
        requests (their outputs go nowhere: rank 0 answers the clients)."""
        if self.rank == 0:
            self._broadcast(([(r.id, r.prompt_ids, r.params, r.group, r.score_from) for r in new], sorted(aborted)))
            return new, aborted
        msg = self._broadcast(None)
        if msg == STOP:
            self.stopped = True
            return [], set()
        adds, aborts = msg
        return [engine.new_request(rid, ids, params, _discard, group=group, score_from=score_from)
                for rid, ids, params, group, score_from in adds], set(aborts)

    def stop(self):
        """Rank 0, once its engine thread has ended: tell the other ranks to exit."""
        if self.rank == 0 and not self.stopped:
            self.stopped = True
            try:
                self._broadcast(STOP)
            except LockstepError as e:
                log.warning("%s", e)

    def fatal(self, message: str):
        log.error("%s", message)
        if self.on_fatal is not None:
            self.on_fatal(message)


def _discard(_out):
    pass


def follow(engine) -> None:
    """A rank other than 0: run rank 0's steps until it stops (returns) or is lost (raises
    LockstepError)."""
    while not engine.lockstep.stopped:
        engine.step()
