"""The OpenAI-compatible HTTP layer (FastAPI): requests in, engine requests out, SSE back.

Knows nothing about batching: every HTTP request becomes one engine request per choice, whose
outputs come back (from the engine thread) into an asyncio queue owned by the HTTP request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from qwen2.errors import Qwen2Error
from qwen2.engine.sampling import SamplingParams
from qwen2.serve import metrics
from qwen2.engine.core import Engine, EngineOverloaded, EngineStopped, RequestOutput
from qwen2.serve.protocol import (MAX_COMPLETION_LOGPROBS, MAX_N, MAX_TOP_LOGPROBS, ChatCompletionRequest,
                       CompletionRequest, error_body)
from qwen2.text.tool_calls import StreamingToolParser, parse_tool_calls

log = logging.getLogger("qwen2.serving")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status)


class _Edge:
    """Pure ASGI middleware (streams pass through untouched): API-key check on /v1 and request
    counts by endpoint and status for /metrics."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        key = self.state.api_key
        if key and path.startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {key}":
                self.state.count(path, 401)
                msg = "missing API key" if not auth else "incorrect API key"
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
            self.state.count(path, status.get("code", 499))


class ServerState:
    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None,
                 defaults: SamplingParams):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.defaults = api_key, defaults
        self.created = int(time.time())
        self.requests: dict[str, int] = {}

    def count(self, path: str, status: int):
        endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                    "/metrics") else "other"
        label = f'endpoint="{endpoint}",status="{status}"'
        self.requests[label] = self.requests.get(label, 0) + 1


def build_app(engine: Engine, tokenizer, model_name: str, *, api_key: str | None = None,
              defaults: SamplingParams | None = None, manage_engine: bool = True) -> FastAPI:
    """The FastAPI app. With manage_engine the app starts the engine thread on startup and shuts
    it down (failing what is still pending) on shutdown."""
    state = ServerState(engine, tokenizer, model_name, api_key, defaults or SamplingParams(temperature=1.0))

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            engine.shutdown()

    app = FastAPI(title="qwen2", lifespan=lifespan)
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
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": state.created,
                                            "owned_by": "qwen2", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        _check_model(state, req.model)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        prompt, forced = _chat_prompt(state, req, use_tools)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = _params(state, req, len(prompt), max_tokens, req.logprobs, req.top_logprobs or 0)
        job = _Job(state, "chatcmpl", [prompt], req.n, params)
        job.forced_prefix = forced
        job.tool_names = {t.function.name for t in req.tools or []}
        await job.submit()
        if req.stream:
            return _sse(request, job, _chat_chunks(state, job, req, use_tools))
        return await job.respond(request, lambda outs: _chat_response(state, job, outs, use_tools))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        _check_model(state, req.model)
        prompts = _completion_prompts(state, req)
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}", param="logprobs")
        params = [_params(state, req, len(p), req.max_tokens, req.logprobs is not None, req.logprobs or 0,
                          default_max=16) for p in prompts]
        job = _Job(state, "cmpl", prompts, req.n, params)
        await job.submit()
        if req.stream:
            return _sse(request, job, _completion_chunks(state, job, req))
        return await job.respond(request, lambda outs: _completion_response(state, job, outs, req))

    return app


# --------------------------------------------------------------------------- request parsing
async def _parse(request: Request, schema):
    body = await request.body()
    try:
        return schema.model_validate_json(body, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"request body is not valid JSON: {err['msg']}") from None
        where = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where or None) from None


def _check_model(state: ServerState, model: str | None):
    if model is not None and model != state.model_name:
        raise APIError(400, f"model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _message_dicts(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        d = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                args = c.function.arguments
                if isinstance(args, str):  # templates render arguments as an object (as vLLM does)
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        raise APIError(400, "tool_calls[].function.arguments is not valid JSON",
                                       param="messages") from None
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
            d["tool_calls"] = calls
        if m.role == "tool" and m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def _chat_prompt(state: ServerState, req: ChatCompletionRequest, use_tools: bool) -> tuple[list[int], str]:
    """Prompt ids, and the text the reply is forced to start with (a named tool_choice)."""
    tok = state.tokenizer
    tools = None
    if req.tools:
        if not tok.supports_tools:
            raise APIError(400, "this model's chat template does not support tools", param="tools")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
    elif req.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    messages = _message_dicts(req)
    if any(m["role"] == "tool" for m in messages) and not tok.supports_tools:
        raise APIError(400, "this model's chat template does not support tool messages", param="messages")
    try:
        ids = tok.encode_chat(messages, add_generation_prompt=True, tools=tools)
    except Qwen2Error as e:
        raise APIError(400, f"cannot render the chat template: {e}", param="messages") from None
    if not use_tools or req.tool_choice is None or isinstance(req.tool_choice, str):
        return ids, ""
    # A named tool: start the reply with the call's opening so the model fills in the arguments.
    name = req.tool_choice.function.get("name")
    if name not in {t.function.name for t in req.tools}:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    forced = f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": '
    return ids + tok.encode(forced), forced


def _completion_prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        items = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    vocab = state.engine.model.config.vocab_size
    out = []
    for x in items:
        ids = state.tokenizer.encode(x) if isinstance(x, str) else list(x)
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        out.append(ids)
    return out


def _params(state: ServerState, req, prompt_len: int, max_tokens: int | None, logprobs: bool,
            top_logprobs: int, default_max: int | None = None) -> SamplingParams:
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}", param="n")
    limit = state.engine.max_model_len
    room = limit - prompt_len
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this server's maximum context length is "
                            f"{limit} tokens (--max-model-len)", param="messages", code="context_length_exceeded")
    if max_tokens is not None:
        if max_tokens <= 0:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                                f"maximum context length of {limit} tokens", param="max_tokens",
                           code="context_length_exceeded")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return state.defaults.replace(
            max_new_tokens=max_tokens or min(default_max or room, room), temperature=req.temperature,
            top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            stop=[s for s in stop if s], seed=req.seed, logprobs=logprobs, top_logprobs=top_logprobs,
            ignore_eos=req.ignore_eos)
    except Qwen2Error as e:
        raise APIError(400, str(e)) from None


# --------------------------------------------------------------------------- running a job
class _Job:
    """One HTTP request: len(prompts) * n engine requests feeding one asyncio queue."""

    def __init__(self, state: ServerState, prefix: str, prompts: list[list[int]], n: int, params):
        self.state = state
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts, self.n = prompts, n
        params = params if isinstance(params, list) else [params] * len(prompts)
        self.params = [p for p in params for _ in range(n)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids = [f"{self.id}-{i}" for i in range(len(prompts) * n)]
        self.done: set[int] = set()
        self.forced_prefix = ""
        self.tool_names: set[str] = set()

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.n]

    async def submit(self):
        loop = asyncio.get_running_loop()
        engine = self.state.engine
        try:
            for i, rid in enumerate(self.ids):
                p = self.params[i]
                if p.seed is not None and i % self.n:
                    p = p.replace(seed=p.seed + i % self.n)   # n choices from one seed must differ
                engine.add_request(rid, self.prompt_of(i), p,
                                   lambda out, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, out)))
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
        for i, rid in enumerate(self.ids):
            if i not in self.done:
                self.state.engine.abort(rid)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while len(self.done) < len(self.ids):
            i, out = await self.queue.get()
            if out.finished:
                self.done.add(i)
            yield i, out

    async def collect(self) -> list[list[RequestOutput]]:
        outs: list[list[RequestOutput]] = [[] for _ in self.ids]
        async for i, out in self.outputs():
            outs[i].append(out)
            if out.error:
                raise APIError(500, out.error, "server_error")
        return outs

    async def respond(self, request: Request, build) -> JSONResponse:
        """Wait for every choice; if the client goes away first, abort (frees the KV blocks)."""
        work = asyncio.ensure_future(self.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                return JSONResponse(error_body("client disconnected"), status_code=499)
            return JSONResponse(build(work.result()))
        finally:
            gone.cancel()
            self.abort()


async def _disconnected(request: Request):
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _sse(request: Request, job: _Job, chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
        finally:
            job.abort()  # no-op for finished choices; frees the blocks of a client that left
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(job: _Job, completion_tokens: int) -> dict:
    prompt = sum(len(p) for p in job.prompts) * job.n
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


# --------------------------------------------------------------------------- logprobs
def _token_str(tok, i: int) -> tuple[str, list[int]]:
    b = tok.decode_bytes([i])
    return b.decode("utf-8", errors="replace"), list(b)


def _chat_logprobs(tok, lps) -> dict:
    content = []
    for lp in lps:
        s, b = _token_str(tok, lp.token_id)
        top = []
        for t, v in lp.top:
            ts, tb = _token_str(tok, t)
            top.append({"token": ts, "logprob": v, "bytes": tb})
        content.append({"token": s, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
    return {"content": content}


def _completion_logprobs(tok, lps, offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        s, _ = _token_str(tok, lp.token_id)
        tokens.append(s)
        values.append(lp.logprob)
        tops.append({_token_str(tok, t)[0]: v for t, v in lp.top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _finish_reason(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length") else "stop"


# --------------------------------------------------------------------------- chat responses
def _chat_response(state: ServerState, job: _Job, outs, use_tools: bool) -> dict:
    choices, generated = [], 0
    for i, seq in enumerate(outs):
        text = "".join(o.text for o in seq)
        last = seq[-1]
        generated += last.completion_tokens
        message = {"role": "assistant", "content": text}
        reason = _finish_reason(last.finish_reason)
        if use_tools:
            content, calls = parse_tool_calls(job.forced_prefix + text, job.tool_names)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                reason = "tool_calls"
        lps = [lp for o in seq for lp in o.logprobs]
        choices.append({"index": i, "message": message,
                        "logprobs": _chat_logprobs(state.tokenizer, lps) if job.params[i].logprobs else None,
                        "finish_reason": reason})
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": state.model_name,
            "system_fingerprint": None, "choices": choices, "usage": _usage(job, generated)}


async def _chat_chunks(state: ServerState, job: _Job, req: ChatCompletionRequest, use_tools: bool):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": state.model_name,
            "system_fingerprint": None}

    def chunk(index, delta, finish=None, logprobs=None):
        c = dict(base, choices=[{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        if include_usage:
            c["usage"] = None
        return c

    parsers = [StreamingToolParser(job.tool_names) if use_tools else None for _ in job.ids]
    for p in parsers:
        if p is not None and job.forced_prefix:
            p.feed(job.forced_prefix)
    called = [False] * len(job.ids)
    for i in range(len(job.ids)):
        yield chunk(i, {"role": "assistant", "content": ""})
    generated = 0
    async for i, out in job.outputs():
        if out.error:
            raise APIError(500, out.error, "server_error")
        text, calls = out.text, []
        if parsers[i] is not None:
            text, calls = parsers[i].feed(text)
            if out.finished:
                t2, c2 = parsers[i].finish()
                text, calls = text + t2, calls + c2
        lp = _chat_logprobs(state.tokenizer, out.logprobs) if job.params[i].logprobs and out.logprobs else None
        if text or lp:
            yield chunk(i, {"content": text}, logprobs=lp)
        if calls:
            called[i] = True
            yield chunk(i, {"tool_calls": calls})
        if out.finished:
            generated += out.completion_tokens
            reason = "tool_calls" if called[i] else _finish_reason(out.finish_reason)
            yield chunk(i, {}, finish=reason)
    if include_usage:
        yield dict(base, choices=[], usage=_usage(job, generated))


# --------------------------------------------------------------------------- completions
def _completion_response(state: ServerState, job: _Job, outs, req: CompletionRequest) -> dict:
    choices, generated = [], 0
    for i, seq in enumerate(outs):
        prefix = state.tokenizer.decode(job.prompt_of(i)) if req.echo else ""
        text = prefix + "".join(o.text for o in seq)
        generated += seq[-1].completion_tokens
        lps = [lp for o in seq for lp in o.logprobs]
        choices.append({"index": i, "text": text,
                        "logprobs": _completion_logprobs(state.tokenizer, lps, len(prefix)) if req.logprobs is not None else None,
                        "finish_reason": _finish_reason(seq[-1].finish_reason)})
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": state.model_name,
            "system_fingerprint": None, "choices": choices, "usage": _usage(job, generated)}


async def _completion_chunks(state: ServerState, job: _Job, req: CompletionRequest):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": job.id, "object": "text_completion", "created": job.created, "model": state.model_name,
            "system_fingerprint": None}
    offsets = [0] * len(job.ids)

    def chunk(index, text, finish=None, logprobs=None):
        c = dict(base, choices=[{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}])
        if include_usage:
            c["usage"] = None
        return c

    if req.echo:
        for i in range(len(job.ids)):
            text = state.tokenizer.decode(job.prompt_of(i))
            offsets[i] = len(text)
            yield chunk(i, text)
    generated = 0
    async for i, out in job.outputs():
        if out.error:
            raise APIError(500, out.error, "server_error")
        lp = None
        if req.logprobs is not None and out.logprobs:
            lp = _completion_logprobs(state.tokenizer, out.logprobs, offsets[i])
        offsets[i] += len(out.text)
        if out.text or lp or not out.finished:
            if out.text or lp:
                yield chunk(i, out.text, logprobs=lp)
        if out.finished:
            generated += out.completion_tokens
            yield chunk(i, "", finish=_finish_reason(out.finish_reason))
    if include_usage:
        yield dict(base, choices=[], usage=_usage(job, generated))


# --------------------------------------------------------------------------- metrics
def render_metrics(state: ServerState) -> str:
    e = state.engine
    s = e.stats
    return metrics.render([
        ("qwen2_http_requests_total", "counter", "HTTP requests by endpoint and status", dict(state.requests)),
        ("qwen2_requests_running", "gauge", "requests in the running batch", e.num_running),
        ("qwen2_requests_waiting", "gauge", "requests waiting for KV cache room", e.num_waiting),
        ("qwen2_request_finished_total", "counter", "finished engine requests by reason",
         {f'reason="{k}"': v for k, v in s.finished.items()}),
        ("qwen2_prompt_tokens_total", "counter", "prompt tokens processed", s.prompt_tokens),
        ("qwen2_generation_tokens_total", "counter", "tokens generated", s.generation_tokens),
        ("qwen2_generation_tokens_per_second", "gauge", "generated tokens/s over the last 10 s",
         round(e.recent_tokens_per_second(), 3)),
        ("qwen2_time_to_first_token_seconds", "histogram", "time from arrival to first token", s.ttft),
        ("qwen2_kv_cache_blocks_total", "gauge", "KV cache blocks in the pool", e.pool.num_blocks),
        ("qwen2_kv_cache_blocks_used", "gauge", "KV cache blocks held by requests",
         e.pool.num_blocks - e.num_free_blocks),
        ("qwen2_engine_steps_total", "counter", "engine steps (one model forward each)", s.steps),
        ("qwen2_engine_busy_seconds_total", "counter", "time spent in engine steps", round(s.busy_seconds, 6)),
        ("qwen2_engine_decode_steps_total", "counter", "engine steps that only decoded", s.decode_steps),
        ("qwen2_engine_decode_seconds_total", "counter", "time spent in decode-only steps",
         round(s.decode_seconds, 6)),
        ("qwen2_preemptions_total", "counter", "requests preempted for KV room", s.preemptions),
    ])
