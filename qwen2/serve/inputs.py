"""Validated requests -> what the engine runs: prompt token ids and SamplingParams.

The checks here are the ones a schema cannot make: they need the model (its name, vocabulary,
context length, chat template).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error
from qwen2.serve.errors import APIError
from qwen2.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from qwen2.serve.state import ServerState


@dataclass
class ToolUse:
    """How to read tool calls out of a reply."""
    names: set[str] = field(default_factory=set)
    forced_prefix: str = ""   # a named tool_choice: the reply was made to start with this call's opening


def check_model(state: ServerState, model: str | None) -> str:
    """The name of the served model (base or adapter) the request asks for; none: the base."""
    if model is None:
        return state.model_name
    if model not in state.engines:
        raise APIError(400, f"model {model!r} does not exist; this server serves "
                            f"{', '.join(repr(m) for m in state.engines)}", param="model", code="model_not_found")
    return model


def chat_prompt(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], ToolUse | None]:
    """Prompt ids, and how to find tool calls in the reply (None: no tools in play)."""
    tok = state.tokenizer
    use_tools = bool(req.tools) and req.tool_choice != "none"
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
    if not use_tools:
        return ids, None
    offered = {t.function.name for t in req.tools}
    if req.tool_choice is None or isinstance(req.tool_choice, str):
        return ids, ToolUse(offered)
    # A named tool: start the reply with the call's opening so the model fills in the arguments.
    name = req.tool_choice.function.get("name")
    if name not in offered:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    forced = f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": '
    return ids + tok.encode(forced), ToolUse(offered, forced)


def _message_dicts(req: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template wants them."""
    out = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        d = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                               for c in m.tool_calls]
        if m.role == "tool" and m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def _arguments(args: str | dict) -> dict:
    # templates render arguments as an object (as vLLM does); OpenAI clients send JSON text
    if not isinstance(args, str):
        return args
    try:
        return json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
        raise APIError(400, "tool_calls[].function.arguments is not valid JSON", param="messages") from None


def completion_prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    items = [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    # The embedding may be padded past the tokenizer (151,936 rows for 151,646 tokens): ids in
    # that gap are no tokens at all, and nothing downstream can decode them.
    vocab = state.engine.model.config.vocab_size
    if hasattr(state.tokenizer, "__len__"):
        vocab = min(vocab, len(state.tokenizer))
    out = []
    for x in items:
        ids = state.tokenizer.encode(x) if isinstance(x, str) else list(x)
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        out.append(ids)
    return out


def sampling_params(state: ServerState, req: SamplingRequest, prompt_len: int) -> SamplingParams:
    """The server's defaults overridden by what the request sets, within the context length."""
    limit = state.engine.max_model_len
    room = limit - prompt_len
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this server's maximum context length is "
                            f"{limit} tokens (--max-model-len)", param=req.prompt_param,
                       code="context_length_exceeded")
    max_tokens, max_param = req.token_limit()
    echo = getattr(req, "echo", False)
    if max_tokens == 0 and not echo:
        raise APIError(400, f"{max_param} must be at least 1 (0 only with echo)", param=max_param)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"{max_param}={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                            f"maximum context length of {limit} tokens", param=max_param,
                       code="context_length_exceeded")
    logprobs, top_logprobs = req.logprob_request()
    # echo: the prompt's own logprobs too (lm-eval's loglikelihood reads them); max_tokens 0 needs
    # them even without logprobs, since the engine then only scores the prompt
    prompt_logprobs = top_logprobs if echo and (logprobs or max_tokens == 0) else None
    try:
        return state.defaults.replace(
            max_new_tokens=min(req.default_max_tokens or room, room) if max_tokens is None else max_tokens,
            prompt_logprobs=prompt_logprobs, temperature=req.temperature,
            top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            stop=req.stop_strings, seed=req.seed, logprobs=logprobs, top_logprobs=top_logprobs,
            ignore_eos=req.ignore_eos)
    except Qwen2Error as e:   # the schema checks every limit; this is a backstop
        raise APIError(400, str(e)) from None
