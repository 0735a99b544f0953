"""Log-likelihood scoring of a GGUF model: float32 activations while scoring (qwen2.eval.lm's
`exact`, the default), so `qwen2 eval` and lm-eval `--model qwen2` give transformers' numbers on
the dequantized file (what lm-eval's `hf` backend computes), also for the few tokens a request
computes after a prefix-cache hit (steps of <= 16 rows, which the block kernels run with int8
activations by default). The model's own setting comes back afterwards."""
from types import SimpleNamespace

import pytest
import torch
from test_gguf import CFG, TYPES, hf_from_gguf, write_gguf
from util import hf_model

from qwen2 import kernels
from qwen2.engine import runner
from qwen2.eval.lm import EngineLM
from qwen2.io.gguf import load_gguf_model
from qwen2.quant.blocks import BlockLinear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="qwen2's kernels cannot be built here")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("llgguf") / "tiny-mixed.gguf", hf_model(CFG, std=0.1), TYPES)


def mc_pairs(n_questions=3, prefix_len=70, seed=0):
    """MMLU-like requests: a shared few-shot prefix, a question each, four one-token choices."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    prefix = rand(prefix_len)
    return [(prefix + q, [c]) for q in (rand(9 + 4 * i) for i in range(n_questions)) for c in (10, 20, 30, 40)]


def reference(hf, pairs):
    """sum log p(continuation | context) from transformers' float32 model of the GGUF file."""
    out = []
    with torch.no_grad():
        for ctx, cont in pairs:
            ids = torch.tensor([ctx + cont])
            lp = torch.log_softmax(hf(ids).logits[0].float(), -1)
            out.append(sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


def engine_lm(path, dtype=None, **kw):
    model = load_gguf_model(path, **({"dtype": dtype} if dtype else {}))   # default: int8 activations on small steps
    runner.prepare(model)
    llm = SimpleNamespace(model=model, tokenizer=SimpleNamespace(eos_token_id=0), eos_token_ids=[0])
    lm = EngineLM(llm, batch_size=4, **kw)
    lm.engine.tokenizer = None             # token ids only: no text to decode
    return lm, model


def test_scoring_equals_transformers_on_the_dequantized_file(gguf_file):
    pairs = mc_pairs()
    ref = reference(hf_from_gguf(gguf_file), pairs)
    lm, model = engine_lm(gguf_file)
    assert lm.exact and lm.has_blocks
    # dequantized (no block kernels): nothing to switch, the same numbers
    deq, _ = engine_lm(gguf_file, dtype="float32")
    assert not deq.has_blocks
    assert [ll for ll, _ in deq.loglikelihood_ids(pairs)] == pytest.approx(ref, abs=2e-4)
    got = [ll for ll, _ in lm.loglikelihood_ids(pairs)]
    assert lm.prefix_cache_hit_rate > 0.5    # the later choices ran as small steps after cache hits
    assert got == pytest.approx(ref, abs=2e-4)
    # the model's own setting is back: int8 activations for generation
    blocks = [m for m in model.modules() if isinstance(m, BlockLinear)]
    assert blocks and not any(m.exact for m in blocks)

    # the int8 path (exact=False) is measurably different: what the default avoids
    fast, _ = engine_lm(gguf_file, exact=False)
    got_fast = [ll for ll, _ in fast.loglikelihood_ids(pairs)]
    assert max(abs(a - b) for a, b in zip(got_fast, ref)) > 1e-3


def test_an_exact_model_stays_exact(gguf_file):
    from qwen2.quant.blocks import set_exact
    lm, model = engine_lm(gguf_file, exact=False)
    set_exact(model)
    lm.loglikelihood_ids(mc_pairs(1))
    assert all(m.exact for m in model.modules() if isinstance(m, BlockLinear))


def test_harness_and_cli_pass_the_setting(gguf_file, monkeypatch):
    from qwen2.eval import harness
    lm, _ = engine_lm(gguf_file)
    assert harness.Qwen2LM(llm=lm.llm).engine_lm.exact
    assert not harness.Qwen2LM(llm=lm.llm, exact="False").engine_lm.exact
    with pytest.raises(ValueError):
        harness.Qwen2LM(llm=lm.llm, exact="maybe")
