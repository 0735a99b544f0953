"""What the routes, the middleware and /metrics share about one server."""
from __future__ import annotations

import time

from qwen2.engine.core import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.serve.limits import Limits
from qwen2.serve.metrics import RequestCounts


class ServerState:
    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None,
                 defaults: SamplingParams, limits: Limits):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.defaults, self.limits = api_key, defaults, limits
        self.created = int(time.time())
        self.requests = RequestCounts()
