"""Tool calls: the <tool_call> parsers, and one real exchange with the embedded demo model
(Qwen2.5-Coder-0.5B-Instruct) through a live server."""
import json

import openai
import pytest

from qwen2.text.tool_calls import StreamingToolParser, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


def test_parse_tagged_blocks():
    content, calls = parse_tool_calls("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"))
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather"] * 2
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Rome", "unit": "celsius"}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    # broken JSON stays text; no tags, no calls
    assert parse_tool_calls("<tool_call>{oops</tool_call>") == ("<tool_call>{oops</tool_call>", [])
    assert parse_tool_calls("just text") == ("just text", [])


def test_parse_bare_json_reply_only_for_offered_tools():
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_tool_calls(bare, {"get_weather"})[1][0]["function"]["name"] == "get_weather"
    assert parse_tool_calls(bare, {"other"}) == (bare, [])


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_streaming_parser_any_split(step):
    text = "Sure <b>" + CALL + " done <tool"
    p = StreamingToolParser({"get_weather"})
    out, calls = "", []
    for i in range(0, len(text), step):
        t, c = p.feed(text[i:i + step])
        out, calls = out + t, calls + c
    t, c = p.finish()
    out, calls = out + t, calls + c
    assert out == "Sure <b> done <tool"
    assert len(calls) == 1 and calls[0]["index"] == 0
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    from qwen2.io.demo import demo_model_path
    from test_serving_api import start_server, stop_server
    path = demo_model_path()
    assert path is not None, "the embedded demo model is not installed (pip install 'qwen2[demo]')"
    proc, url = start_server(path, "--max-model-len", "2048", log_dir=tmp_path_factory.mktemp("demo_logs"))
    yield url
    assert stop_server(proc) == 0


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.slow
def test_demo_model_reply_and_tool_call(demo_server):
    client = openai.OpenAI(base_url=demo_server + "/v1", api_key="none", max_retries=0, timeout=600)
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content

    ask = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    stream = client.chat.completions.create(model="tiny", messages=ask, tools=WEATHER, max_tokens=40,
                                            temperature=0, stream=True)
    calls, finish = [], None
    for chunk in stream:
        if chunk.choices:
            calls += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]

    # the tool's answer goes back as a role "tool" message
    follow = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'}]
    r = client.chat.completions.create(model="tiny", messages=follow, tools=WEATHER, max_tokens=24, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
