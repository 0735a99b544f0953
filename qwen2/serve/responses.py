"""Engine outputs -> OpenAI response bodies and stream chunks, and the SSE framing of streams."""
from __future__ import annotations

import logging
from typing import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from qwen2.serve.errors import APIError
from qwen2.serve.inputs import ToolUse
from qwen2.serve.jobs import Job
from qwen2.serve.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                  ChatCompletionChunk, ChatLogprobs, Completion, CompletionChoice,
                                  CompletionLogprobs, Delta, TokenLogprob, TopLogprob)
from qwen2.serve.state import ServerState
from qwen2.text.tool_calls import StreamingToolParser, parse_tool_calls

log = logging.getLogger("qwen2.serve")

STATUS = "qwen2.status"   # scope key: the status a stream ended with, for /metrics (the 200 went out first)


def sse(job: Job, chunks: AsyncIterator[BaseModel], include_usage: bool, scope: dict) -> StreamingResponse:
    """OpenAI's server-sent events: one `data: {json}` per chunk, then `data: [DONE]`. An error
    after the 200 went out can only be reported in the stream, as an error chunk, still followed
    by [DONE]; /metrics counts the request under the error's status."""
    exclude = None if include_usage else {"usage"}

    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"
        except Exception as e:   # this request's failure (engine, tool-call parsing, ...): its stream alone ends
            if not isinstance(e, APIError):
                log.exception("stream %s failed", job.id)
                e = APIError(500, f"internal error: {type(e).__name__}", "server_error")
            scope[STATUS] = e.status
            yield f"data: {e.body.model_dump_json()}\n\n"
        finally:
            job.abort()  # frees the blocks of a client that left
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _head(state: ServerState, job: Job) -> dict:
    return {"id": job.id, "created": job.created, "model": job.model or state.model_name}


def _finish_reason(reason: str | None) -> str | None:
    # the engine's other reasons (abort, error) are not OpenAI's; the client sees the text end
    return reason if reason in (None, "stop", "length") else "stop"


# --------------------------------------------------------------------------- logprobs
def _token_str(tok, i: int) -> tuple[str, list[int]]:
    b = tok.decode_bytes([i])
    return b.decode("utf-8", errors="replace"), list(b)


def _chat_logprobs(tok, lps) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> dict:
        s, b = _token_str(tok, token_id)
        return {"token": s, "logprob": logprob, "bytes": b}
    return ChatLogprobs(content=[
        TokenLogprob(**entry(lp.token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
        for lp in lps])


def _completion_logprobs(tok, lps, offset: int, ids: list[int] | None = None) -> CompletionLogprobs:
    """The legacy logprobs of generated tokens, or of prompt tokens (`ids`; an entry None where
    nothing precedes the token). As in OpenAI and vLLM, each position's top_logprobs holds the
    chosen token beside the N best."""
    tokens, values, tops, offsets = [], [], [], []
    for j, lp in enumerate(lps):
        s, _ = _token_str(tok, lp.token_id if lp is not None else ids[j])
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(lp.logprob)
        top = {_token_str(tok, t)[0]: v for t, v in lp.top}
        top.setdefault(s, lp.logprob)
        tops.append(top)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _joined(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    return CompletionLogprobs(**{k: [x for p in parts for x in getattr(p, k)]
                                 for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")})


# --------------------------------------------------------------------------- chat
def chat_completion(state: ServerState, job: Job, outs, tools: ToolUse | None) -> ChatCompletion:
    choices = []
    for i, seq in enumerate(outs):
        text = "".join(o.text for o in seq)
        message, reason = AssistantMessage(content=text), _finish_reason(seq[-1].finish_reason)
        if tools:
            content, calls = parse_tool_calls(tools.forced_prefix + text, tools.names)
            if calls:
                message, reason = AssistantMessage(content=content or None, tool_calls=calls), "tool_calls"
        lps = [lp for o in seq for lp in o.logprobs]
        choices.append(ChatChoice(index=i, message=message, finish_reason=reason,
                                  logprobs=_chat_logprobs(state.tokenizer, lps) if job.params[i].logprobs else None))
    return ChatCompletion(**_head(state, job), choices=choices, usage=job.usage())


async def chat_chunks(state: ServerState, job: Job, tools: ToolUse | None,
                      include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(index, delta, finish=None, logprobs=None):
        return ChatCompletionChunk(**_head(state, job), choices=[
            ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)])

    parsers = [StreamingToolParser(tools.names) if tools else None for _ in job.ids]
    for p in parsers:
        if p is not None and tools.forced_prefix:
            p.feed(tools.forced_prefix)
    called = [False] * len(job.ids)
    for i in range(len(job.ids)):
        yield chunk(i, Delta(role="assistant", content=""))
    async for i, out in job.outputs():
        text, calls = out.text, []
        if parsers[i] is not None:
            text, calls = parsers[i].feed(text)
            if out.finished:
                t2, c2 = parsers[i].finish()
                text, calls = text + t2, calls + c2
        lp = _chat_logprobs(state.tokenizer, out.logprobs) if job.params[i].logprobs and out.logprobs else None
        if text or lp:
            yield chunk(i, Delta(content=text), logprobs=lp)
        if calls:
            called[i] = True
            yield chunk(i, Delta(tool_calls=calls))
        if out.finished:
            yield chunk(i, Delta(), finish="tool_calls" if called[i] else _finish_reason(out.finish_reason))
    if include_usage:
        yield ChatCompletionChunk(**_head(state, job), choices=[], usage=job.usage())


# --------------------------------------------------------------------------- completions
def completion(state: ServerState, job: Job, outs, echo: bool) -> Completion:
    choices = []
    for i, seq in enumerate(outs):
        prefix = state.tokenizer.decode(job.prompt_of(i)) if echo else ""
        logprobs = None
        if job.params[i].logprobs:
            lps = [lp for o in seq for lp in o.logprobs]
            logprobs = _completion_logprobs(state.tokenizer, lps, len(prefix))
            if echo:
                logprobs = _joined([_echo_logprobs(state, job, i, seq), logprobs])
        choices.append(CompletionChoice(
            index=i, text=prefix + "".join(o.text for o in seq), finish_reason=_finish_reason(seq[-1].finish_reason),
            logprobs=logprobs))
    return Completion(**_head(state, job), choices=choices, usage=job.usage())


def _echo_logprobs(state: ServerState, job: Job, i: int, outs) -> CompletionLogprobs:
    """The prompt's logprobs, from the choice's first output (the engine sends them there)."""
    plps = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
    ids = job.prompt_of(i)
    return _completion_logprobs(state.tokenizer, plps or [None] * len(ids), 0, ids)


async def completion_chunks(state: ServerState, job: Job, echo: bool,
                            include_usage: bool) -> AsyncIterator[Completion]:
    def chunk(index, text, finish=None, logprobs=None):
        return Completion(**_head(state, job), choices=[
            CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)])

    offsets = [0] * len(job.ids)   # where each choice's next token starts, for logprobs.text_offset
    echoed = [not echo] * len(job.ids)

    def echo_chunk(i, out):
        text = state.tokenizer.decode(job.prompt_of(i))
        offsets[i], echoed[i] = len(text), True
        return chunk(i, text, logprobs=_echo_logprobs(state, job, i, [out]) if job.params[i].logprobs else None)

    if echo:
        # Without logprobs the prompt goes out at once; with them it waits for the choice's first
        # output, which carries the prompt's logprobs.
        for i in range(len(job.ids)):
            if not job.params[i].logprobs:
                yield echo_chunk(i, None)
    async for i, out in job.outputs():
        if not echoed[i]:
            yield echo_chunk(i, out)
        lp = None
        if job.params[i].logprobs and out.logprobs:
            lp = _completion_logprobs(state.tokenizer, out.logprobs, offsets[i])
        offsets[i] += len(out.text)
        if out.text or lp:
            yield chunk(i, out.text, logprobs=lp)
        if out.finished:
            yield chunk(i, "", finish=_finish_reason(out.finish_reason))
    if include_usage:
        yield Completion(**_head(state, job), choices=[], usage=job.usage())
