"""The OpenAI-compatible HTTP app (FastAPI): routes and the API-key check.

Where the rest lives: protocol.py (the wire format as pydantic models), errors.py (error bodies,
body parsing), inputs.py (request -> prompt ids and SamplingParams), jobs.py (engine requests of
one HTTP request), responses.py (response bodies, stream chunks, SSE), metrics.py (/metrics).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from qwen2.engine.core import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.serve import inputs, metrics, responses
from qwen2.serve.errors import APIError, json_response, parse_request
from qwen2.serve.jobs import Job
from qwen2.serve.limits import Limits, read_body
from qwen2.serve.protocol import ChatCompletionRequest, CompletionRequest, Health, ModelCard, ModelList
from qwen2.serve.state import ServerState

log = logging.getLogger("qwen2.serve")


class _Edge:
    """Pure ASGI middleware, so streams pass through untouched: the API-key check on /v1 and
    request counts by endpoint and status for /metrics."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.expected = f"Bearer {state.api_key}".encode() if state.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.expected and path.startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            # constant time: the time a plain == takes would tell a client how much of a guess is right
            if not hmac.compare_digest(auth, self.expected):
                self.state.requests.count(path, 401)
                msg = "incorrect API key" if auth else "missing API key"
                resp = APIError(401, msg, "authentication_error", code="invalid_api_key").response()
                return await resp(scope, receive, send)
        status = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # 499: the client left first; a stream that failed after its 200 counts as its error
            self.state.requests.count(path, scope.get(responses.STATUS) or status.get("code", 499))


async def json_body(request: Request, limits: Limits) -> bytes:
    """The body of a JSON request, within the size and time limits. Anything but JSON is refused:
    a web page may send a text/plain POST to a local server without a CORS preflight, and must
    not be able to drive it."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"Content-Type must be application/json, not {kind or 'missing'!r}",
                       code="unsupported_media_type", close=True)
    return await read_body(request, limits)


def build_app(engine: Engine, tokenizer, model_name: str, *, api_key: str | None = None,
              defaults: SamplingParams | None = None, manage_engine: bool = True,
              limits: Limits = Limits(), adapters: dict[str, Engine] | None = None) -> FastAPI:
    """The FastAPI app. With manage_engine the app starts the engine threads on startup and shuts
    them down (failing what is still pending) on shutdown. adapters: model name -> the engine of a
    LoRA adapter over the same base (qwen2.io.adapter.with_adapter); a request's `model` picks."""
    state = ServerState(engine, tokenizer, model_name, api_key, defaults or SamplingParams(temperature=1.0), limits,
                        adapters)
    registry = metrics.registry_for(state)
    limits = state.limits

    @asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        if manage_engine:
            for e in state.engines.values():
                e.start()
        yield
        if manage_engine:
            # requests in flight have ended by now (state.close); a step still running is not waited for long
            for e in state.engines.values():
                e.shutdown(timeout=1)

    app = FastAPI(title="qwen2", lifespan=lifespan)
    app.openapi = lambda: _openapi(app)
    app.state.server = state
    app.add_middleware(_Edge, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    @app.get("/health")
    async def health():
        return json_response(Health())

    @app.get("/v1/models")
    async def models():
        cards = [ModelCard(id=name, created=state.created, max_model_len=e.max_model_len,
                           parent=None if name == model_name else model_name) for name, e in state.engines.items()]
        return json_response(ModelList(data=cards))

    @app.get("/metrics")
    async def get_metrics(request: Request):
        body, content_type = metrics.exposition(registry, request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        # parsing and tokenizing run off the event loop: a large body must not stall every stream
        req = await run_in_threadpool(parse_request, await json_body(request, limits), ChatCompletionRequest)
        name = inputs.check_model(state, req.model)
        prompt, tools = await run_in_threadpool(inputs.chat_prompt, state, req)
        job = Job(state.engines[name], "chatcmpl", [prompt], req.n, [inputs.sampling_params(state, req, len(prompt))],
                  limits.max_queued_per_request, state.jobs, model=name)
        await job.submit()
        if req.stream:
            return responses.sse(job, responses.chat_chunks(state, job, tools, req.include_usage), req.include_usage,
                                 request.scope)
        return json_response(responses.chat_completion(state, job, await job.collect(request), tools))

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request):
        req = await run_in_threadpool(parse_request, await json_body(request, limits), CompletionRequest)
        name = inputs.check_model(state, req.model)
        prompts = await run_in_threadpool(inputs.completion_prompts, state, req)
        job = Job(state.engines[name], "cmpl", prompts, req.n, [inputs.sampling_params(state, req, len(p)) for p in prompts],
                  limits.max_queued_per_request, state.jobs, model=name)
        await job.submit()
        if req.stream:
            return responses.sse(job, responses.completion_chunks(state, job, req.echo, req.include_usage),
                                 req.include_usage, request.scope)
        return json_response(responses.completion(state, job, await job.collect(request), req.echo))

    return app


# The routes read their bodies themselves (size and time limits, errors that name the parameter),
# so FastAPI cannot see the request models: /openapi.json declares them here, for clients and
# for the schema-driven fuzz test (tests/test_serve_fuzz.py).
_REQUESTS = (ChatCompletionRequest, CompletionRequest)


def _json_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in _REQUESTS],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema
