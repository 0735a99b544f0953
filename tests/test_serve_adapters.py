"""`qwen2 serve --adapter NAME=DIR`: LoRA adapters served beside their base model, chosen by the
request's "model", over one copy of the base weights. Concurrent greedy requests for the base and
two adapters (one saved by PEFT, one by us) over live HTTP give each model's own output, as
`qwen2.load(ckpt, adapter=DIR)` (merged into the weights: the independent path) gives it alone;
/v1/models lists them; bad adapters stop the server at startup with one line."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from test_serving_api import KEY, start_server, stop_server
from util import peft_lora

import qwen2
from qwen2.errors import Qwen2Error
from qwen2.io.adapter import save_adapter
from qwen2.model.lora import add_lora, lora_modules

peft = pytest.importorskip("peft")

AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The capital of France is", "def fib(n):", "Once upon a time"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def adapters(ckpt, tmp_path_factory):
    """{name: dir}: one adapter saved by PEFT (q, v), one by us (every projection)."""
    from conftest import QWEN_VOCAB
    d = tmp_path_factory.mktemp("adapters")
    theirs = peft_lora(QWEN_VOCAB, 1, 0.5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs.save_pretrained(d / "peft")
    ours = add_lora(qwen2.load_model(ckpt, dtype="float32"), r=8, alpha=16)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, m in lora_modules(ours):
            for p in (*m.lora_A.values(), *m.lora_B.values()):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    save_adapter(ours, d / "ours")
    return {"peft": d / "peft", "ours": d / "ours"}


def alone(ckpt, adapter=None) -> list[str]:
    """Each prompt's greedy reply from the model loaded alone (an adapter merged into the weights)."""
    llm = qwen2.load(ckpt, dtype="float32", adapter=adapter)
    return [c.text for c in llm.generate(PROMPTS, max_new_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)]


def test_concurrent_requests_for_base_and_two_adapters(ckpt, adapters, tmp_path):
    want = {"tiny": alone(ckpt), **{name: alone(ckpt, d) for name, d in adapters.items()}}
    assert want["tiny"] != want["peft"] and want["tiny"] != want["ours"] and want["peft"] != want["ours"]
    proc, url = start_server(ckpt, "--api-key", KEY, "--max-model-len", "256", "--max-batch", "4",
                             *[f"--adapter={n}={d}" for n, d in adapters.items()], log_dir=tmp_path)
    try:
        models = httpx.get(url + "/v1/models", headers=AUTH).json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("peft", "tiny"), ("ours", "tiny")]

        def complete(job):
            name, prompt = job
            r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=120, json={
                "model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name
            return r.json()["choices"][0]["text"]

        # every model's prompts at once, twice over, interleaved: all three engines busy together
        jobs = [(name, p) for _ in range(2) for p in PROMPTS for name in want]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(complete, jobs))
        for (name, prompt), text in zip(jobs, got):
            assert text == want[name][PROMPTS.index(prompt)], (name, prompt)
        # chat picks the adapter too; an unknown name lists what is served
        r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={
            "model": "ours", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "ours"
        r = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "nope", "prompt": "x"})
        assert r.status_code == 400 and "'tiny', 'peft', 'ours'" in r.json()["error"]["message"]
    finally:
        assert stop_server(proc) == 0


def test_bad_adapter_is_one_line_at_startup(ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen2.cli", "serve", "--model", str(ckpt), "--port", "0",
                        "--adapter", f"x={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--adapter x:" in lines[0] and "adapter_config.json" in lines[0], r.stderr


def test_adapter_that_does_not_fit_the_base(ckpt, adapters, tmp_path):
    """An adapter for another model size, and one whose config's rank disagrees with its tensors:
    one error naming the adapter and the tensor, before serving."""
    import argparse
    from qwen2.cli import serve
    from qwen2.cli.serve import build_server
    from util import TINY
    other = add_lora(qwen2.load_model(_checkpoint(tmp_path / "wide", dict(TINY, hidden_size=128)), dtype="float32"),
                     r=4, targets=("q_proj",))
    save_adapter(other, tmp_path / "wide-ad")
    cfg = json.loads((adapters["ours"] / "adapter_config.json").read_text())
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "adapter_config.json").write_text(json.dumps(dict(cfg, r=3)))
    (tmp_path / "r3" / "adapter_model.safetensors").write_bytes((adapters["ours"] / "adapter_model.safetensors").read_bytes())
    ap = argparse.ArgumentParser()
    serve.register(ap.add_subparsers())
    for name, d in (("wide", tmp_path / "wide-ad"), ("r3", tmp_path / "r3")):
        args = ap.parse_args(["serve", "--model", str(ckpt), "--dtype", "float32", "--adapter", f"{name}={d}",
                              "--max-model-len", "64"])
        with pytest.raises(Qwen2Error, match=rf"^--adapter {name}: .*lora_A.weight has shape"):
            build_server(args)
    args = ap.parse_args(["serve", "--model", str(ckpt), "--adapter", f"tiny2={d}", "--adapter", f"tiny2={d}"])
    with pytest.raises(Qwen2Error, match="'tiny2' is already served"):
        build_server(args)


def _checkpoint(path, config):
    from util import make_hf_checkpoint
    return make_hf_checkpoint(path, config)[1]
