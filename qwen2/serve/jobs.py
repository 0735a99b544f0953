"""One HTTP request's engine requests, and getting their outputs back onto the event loop.

The server knows nothing about batching: each choice becomes one engine request, whose outputs
come back (from the engine thread) into an asyncio queue owned by the HTTP request.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi import Request

from qwen2.engine.core import Engine, EngineOverloaded, EngineStopped, RequestOutput
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error
from qwen2.serve.errors import APIError
from qwen2.serve.protocol import Usage


class Job:
    """len(prompts) * n engine requests feeding one asyncio queue; choice i is prompt i // n.
    At most `window` of them are in the engine at once (the next goes in as one finishes), all
    in one admission group: a request with many prompts neither fills the queue (429 for
    everyone else) nor holds the batch against later requests."""

    def __init__(self, engine: Engine, prefix: str, prompts: list[list[int]], n: int,
                 params: list[SamplingParams], window: int = 64, live: set | None = None, model: str = ""):
        self.engine, self.model = engine, model   # model: the name the response reports
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts, self.n = prompts, n
        self.params = [p for p in params for _ in range(n)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids = [f"{self.id}-{i}" for i in range(len(prompts) * n)]
        self.done: set[int] = set()
        self.completion_tokens = 0
        self.window, self.added = max(window, 1), 0   # engine requests 0..added-1 have been added
        self.live = live if live is not None else set()   # the server's jobs in flight; this one until abort()
        self.closing = False

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.n]

    def usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts) * self.n
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                     total_tokens=prompt + self.completion_tokens)

    async def submit(self):
        self.loop = asyncio.get_running_loop()
        self.live.add(self)
        self._refill(check_waiting=True)

    def _refill(self, check_waiting: bool = False):
        """Add engine requests up to the window. Only the first window counts against the
        engine's max_waiting: the later ones take the places of finished ones."""
        try:
            while self.added < len(self.ids) and self.added - len(self.done) < self.window:
                i = self.added
                p = self.params[i]
                if p.seed is not None and i % self.n:
                    p = p.replace(seed=p.seed + i % self.n)   # n choices from one seed must differ
                self.engine.add_request(self.ids[i], self.prompt_of(i), p,
                                        lambda out, i=i: self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, out)),
                                        group=self.id, check_waiting=check_waiting)
                self.added += 1
        except EngineOverloaded as e:
            self.abort()
            raise APIError(429, f"server overloaded: {e}; retry later", "rate_limit_error",
                           code="rate_limit_exceeded") from None
        except EngineStopped as e:
            self.abort()
            raise APIError(503, str(e), "server_error") from None
        except (ValueError, Qwen2Error) as e:
            self.abort()
            raise APIError(400, str(e)) from None

    def abort(self):
        """Frees the KV blocks of unfinished choices (a no-op for finished ones); adds no more."""
        for i in range(self.added):
            if i not in self.done:
                self.engine.abort(self.ids[i])
        self.window = 0
        self.live.discard(self)

    def fail(self, message: str):
        """End every unfinished choice now with `message` (server shutdown; event loop only)."""
        self.closing = True
        for i, rid in enumerate(self.ids):
            if i not in self.done:
                self.queue.put_nowait((i, RequestOutput(rid, finished=True, finish_reason="error", error=message)))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they come, until every choice has finished."""
        while len(self.done) < len(self.ids):
            i, out = await self.queue.get()
            if out.finished:
                self.done.add(i)
                self.completion_tokens += out.completion_tokens
            if out.error:
                raise APIError(503 if self.closing else 500, out.error, "server_error")
            if out.finished:
                self._refill()
            yield i, out

    async def collect(self, request: Request) -> list[list[RequestOutput]]:
        """Every choice's outputs; if the client goes away first, abort (frees the KV blocks)."""
        outs: list[list[RequestOutput]] = [[] for _ in self.ids]

        async def gather():
            async for i, out in self.outputs():
                outs[i].append(out)

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                raise APIError(499, "client disconnected")
            work.result()   # re-raises an engine error
            return outs
        finally:
            gone.cancel()
            self.abort()


async def _disconnected(request: Request):
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return
