"""The server's wire format without a model: request limits and the JSON shapes of responses."""
import json

import pytest

from qwen2.engine.stats import Histogram
from qwen2.serve.errors import APIError, parse_request
from qwen2.serve.protocol import (AssistantMessage, ChatCompletionChunk, ChatChunkChoice, ChatCompletionRequest,
                                  CompletionRequest, Delta, ErrorInfo, ErrorResponse, ToolCallOut, Usage)

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return json.dumps({"messages": MSG, **kw}).encode()


def bad(schema, body) -> APIError:
    with pytest.raises(APIError) as e:
        parse_request(body, schema)
    assert e.value.status == 400 and e.value.info.type == "invalid_request_error"
    return e.value


LIMITS = [  # (field, a value just outside, its neighbour just inside)
    ("n", 0, 1), ("n", 17, 16), ("max_tokens", 0, 1), ("max_completion_tokens", 0, 1),
    ("temperature", -0.01, 0), ("top_p", 0, 0.01), ("top_p", 1.01, 1), ("top_k", -1, 0),
    ("min_p", -0.1, 0), ("min_p", 1.1, 1), ("repetition_penalty", 0, 0.01),
    ("presence_penalty", -2.1, -2), ("presence_penalty", 2.1, 2), ("frequency_penalty", -2.1, -2),
    ("frequency_penalty", 2.1, 2),
]


@pytest.mark.parametrize("field,outside,inside", LIMITS, ids=[f"{f}={o}" for f, o, _ in LIMITS])
def test_chat_limits_name_the_parameter(field, outside, inside):
    err = bad(ChatCompletionRequest, chat(**{field: outside})).info
    assert err.param == field and err.message.startswith(f"{field} must be ") and repr(outside) in err.message
    assert getattr(parse_request(chat(**{field: inside}), ChatCompletionRequest), field) == inside


def test_logprob_limits():
    assert bad(ChatCompletionRequest, chat(logprobs=True, top_logprobs=21)).info.param == "top_logprobs"
    assert parse_request(chat(logprobs=True, top_logprobs=20), ChatCompletionRequest).top_logprobs == 20
    err = bad(ChatCompletionRequest, chat(top_logprobs=2)).info       # needs logprobs=true
    assert err.param == "top_logprobs" and "logprobs=true" in err.message
    assert parse_request(chat(top_logprobs=0), ChatCompletionRequest).top_logprobs == 0
    for v in (-1, 6):
        err = bad(CompletionRequest, json.dumps({"prompt": "x", "logprobs": v}).encode()).info
        assert err.param == "logprobs" and "between 0 and 5" in err.message
    assert parse_request(json.dumps({"prompt": "x", "logprobs": 5}).encode(), CompletionRequest).logprobs == 5


def test_types_are_strict_and_errors_point_inside_the_body():
    assert bad(ChatCompletionRequest, chat(max_tokens="10")).info.param == "max_tokens"
    assert bad(ChatCompletionRequest, chat(stream=1)).info.param == "stream"
    assert bad(ChatCompletionRequest, b'{"messages": [{"role": "wizard"}]}').info.param == "messages.0.role"
    assert bad(ChatCompletionRequest, b'{"messages": []}').info.param == "messages"
    e = bad(ChatCompletionRequest, b'{"messages": [')
    assert e.info.param is None and "not valid JSON" in e.info.message
    e = bad(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert e.info.param == "temperature"
    # unknown fields are ignored (newer clients keep working)
    assert parse_request(chat(some_new_field=1), ChatCompletionRequest).messages[0].content == "hi"


def test_token_limit_and_stop_strings():
    req = parse_request(chat(max_tokens=5, max_completion_tokens=7, stop=["", "x"]), ChatCompletionRequest)
    assert req.token_limit() == (7, "max_completion_tokens") and req.stop_strings == ["x"]
    req = parse_request(json.dumps({"prompt": "x", "stop": "y"}).encode(), CompletionRequest)
    assert req.token_limit() == (None, "max_tokens") and req.stop_strings == ["y"]


def test_response_shapes_left_out_vs_null():
    """OpenAI leaves some unset fields out and sends others as null."""
    assert json.loads(Delta().model_dump_json()) == {}
    assert json.loads(Delta(role="assistant", content="").model_dump_json()) == {"role": "assistant", "content": ""}
    assert json.loads(AssistantMessage(content="hi").model_dump_json()) == {"role": "assistant", "content": "hi"}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msg = json.loads(AssistantMessage(content=None, tool_calls=[call]).model_dump_json())
    assert msg == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert json.loads(ToolCallOut(index=0, **call).model_dump_json())["index"] == 0
    chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[ChatChunkChoice(index=0, delta=Delta())])
    full = json.loads(chunk.model_dump_json())
    assert full["usage"] is None and full["system_fingerprint"] is None
    assert full["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": None}]
    assert "usage" not in json.loads(chunk.model_dump_json(exclude={"usage"}))
    last = ChatCompletionChunk(id="c", created=1, model="m", choices=[],
                               usage=Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5))
    assert json.loads(last.model_dump_json())["usage"]["total_tokens"] == 5
    err = json.loads(ErrorResponse(error=ErrorInfo(message="m")).model_dump_json())
    assert err == {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}


def test_histogram_snapshot_is_cumulative():
    h = Histogram(buckets=(0.1, 1))
    for v in (0.1, 0.5, 1, 7):          # a value on a bound falls in that bound's bucket (le)
        h.observe(v)
    bounds, total = h.snapshot()
    assert bounds == [(0.1, 1), (1.0, 3), (float("inf"), 4)] and total == pytest.approx(8.6)


def test_openai_ranges_for_temperature_stop_and_seed():
    """OpenAI's own limits: temperature 0..2, at most 4 stop strings, a seed that fits 64 bits;
    each refusal names its parameter, and the value just inside is accepted."""
    err = bad(ChatCompletionRequest, chat(temperature=2.01)).info
    assert err.param == "temperature"
    assert bad(ChatCompletionRequest, chat(temperature=1e308)).info.param == "temperature"
    assert parse_request(chat(temperature=2), ChatCompletionRequest).temperature == 2
    assert bad(ChatCompletionRequest, chat(stop=["a", "b", "c", "d", "e"])).info.param == "stop"
    assert parse_request(chat(stop=["a", "b", "c", "d"]), ChatCompletionRequest).stop_strings == ["a", "b", "c", "d"]
    for seed in (2 ** 70, -(2 ** 63) - 1):
        err = bad(ChatCompletionRequest, chat(seed=seed)).info
        assert err.param == "seed" and "overflow" not in err.message.lower()
    assert parse_request(chat(seed=2 ** 64 - 1), ChatCompletionRequest).seed == 2 ** 64 - 1
