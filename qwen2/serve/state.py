"""What the routes, the middleware and /metrics share about one server."""
from __future__ import annotations

import time

from qwen2.engine.core import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.serve.limits import Limits
from qwen2.serve.metrics import RequestCounts


class ServerState:
    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None,
                 defaults: SamplingParams, limits: Limits, adapters: dict[str, Engine] | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        # model name -> the engine serving it: the base model, then each LoRA adapter's own engine
        # (its own KV cache and prefix cache: no request ever reads another model's keys)
        self.engines: dict[str, Engine] = {model_name: engine, **(adapters or {})}
        self.api_key, self.defaults, self.limits = api_key, defaults, limits
        self.created = int(time.time())
        self.requests = RequestCounts()
        self.jobs: set = set()     # HTTP requests in flight (serve.jobs.Job), so a shutdown can end them
        self.loop = None           # the event loop, once the app has started

    def close(self, message: str = "server is shutting down"):
        """Shutdown's deadline (on the event loop): the engine takes nothing more, and every HTTP
        request still in flight ends now (503; a stream with an error event and [DONE]), whatever
        the engine thread is doing (a step may be stuck in a compile or a huge prefill)."""
        for engine in self.engines.values():
            engine.shutdown(timeout=0)
        for job in list(self.jobs):
            job.fail(message)
