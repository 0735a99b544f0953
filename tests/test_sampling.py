"""qwen2.engine.sampling against transformers' logits processors, plus a chi-square check that sampling
draws from the analytic distribution."""
import json

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import qwen2
from qwen2.errors import Qwen2Error
from qwen2.engine.sampling import SamplingParams, make_generator, process_logits, sample


def same_filtered(a, b):
    """Equal -inf pattern and close finite values."""
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-5, atol=1e-5)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(3, 100) * 3
    prompts = [[1, 2, 3, 50], [7, 7, 8], [99]]
    outputs = [[4, 5, 1], [], [0, 98, 98]]
    for penalty in (1.3, 0.7):
        params = [SamplingParams(temperature=0, repetition_penalty=penalty)] * 3
        got = process_logits(logits, params, outputs, prompts)
        proc = RepetitionPenaltyLogitsProcessor(penalty)
        for i in range(3):
            ids = torch.tensor([prompts[i] + outputs[i]])
            ref = proc(ids, logits[i:i + 1].clone())
            torch.testing.assert_close(got[i:i + 1], ref)


def test_presence_frequency_penalties_openai_semantics():
    logits = torch.zeros(1, 10)
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    got = process_logits(logits, [p], [[3, 3, 3, 7]], [[1, 2]])  # prompt tokens are not penalized
    want = torch.zeros(1, 10)
    want[0, 3] = -0.5 - 3 * 0.25
    want[0, 7] = -0.5 - 0.25
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.0, top_k=5), dict(temperature=1.3, top_p=0.6),
                                dict(temperature=0.5, min_p=0.1), dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.02)])
@pytest.mark.parametrize("vocab,scale", [(200, 2.0), (5000, 3.0), (5000, 0.3)])  # nucleus inside / past the window
def test_warpers_match_transformers(kw, vocab, scale):
    torch.manual_seed(1)
    logits = torch.randn(2, vocab) * scale
    params = [SamplingParams(**kw), SamplingParams(temperature=0)]  # a greedy row rides along untouched
    got = process_logits(logits, params, [[], []], [[], []])
    ref = logits[:1].clone()
    ref = TemperatureLogitsWarper(kw["temperature"])(None, ref)
    if kw.get("top_k"):
        ref = TopKLogitsWarper(kw["top_k"])(None, ref)
    if kw.get("top_p"):
        ref = TopPLogitsWarper(kw["top_p"])(None, ref)
    if kw.get("min_p"):
        ref = MinPLogitsWarper(kw["min_p"])(None, ref)
    same_filtered(got[:1], ref)
    torch.testing.assert_close(got[1], logits[1])


def analytic(logits, temperature, top_k, top_p):
    """The textbook distribution, computed one token at a time in plain Python."""
    z = (logits / temperature).tolist()
    order = sorted(range(len(z)), key=lambda i: -z[i])[:top_k or len(z)]
    w = {i: torch.tensor(z[i]).exp().item() for i in order}
    total = sum(w.values())
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += w[i] / total
    norm = sum(w[i] for i in kept)
    p = torch.zeros(len(z), dtype=torch.float64)
    for i in kept:
        p[i] = w[i] / norm
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.0, 8, 1.0), (1.5, 0, 0.9), (1.0, 0, 1.0)])
def test_empirical_distribution_matches_analytic(tiny_ckpt, temperature, top_k, top_p):
    _, path = tiny_ckpt
    model = qwen2.load_model(path, dtype="float32")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]]))[0, -1] * 4  # sharpen the random model
    p = analytic(logits, temperature, top_k, top_p)
    n = 20000
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * n
    g = make_generator(1234)
    tokens, _ = sample(process_logits(logits.expand(n, -1), params, [[]] * n), params, [g] * n)
    counts = torch.bincount(tokens, minlength=logits.numel()).double()
    assert counts[p == 0].sum() == 0, "sampled a token outside the allowed set"
    # Pool the rare tokens so that every chi-square cell expects at least 5 draws.
    exp = p * n
    big = exp >= 5
    obs_cells = torch.cat([counts[big], counts[~big & (p > 0)].sum()[None]])
    exp_cells = torch.cat([exp[big], exp[~big & (p > 0)].sum()[None]])
    if exp_cells[-1] == 0:
        obs_cells, exp_cells = obs_cells[:-1], exp_cells[:-1]
    assert len(exp_cells) > 3
    stat, pvalue = chisquare(obs_cells.numpy(), exp_cells.numpy())
    assert pvalue > 1e-3, (stat, pvalue)


def test_same_seed_same_sample():
    torch.manual_seed(0)
    logits = torch.randn(1, 1000)
    p = [SamplingParams(temperature=1.0)]
    draw = lambda seed: [sample(logits, p, [g])[0].item() for g in [make_generator(seed)] for _ in range(20)]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_greedy_and_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    p = [SamplingParams(temperature=0, logprobs=True, top_logprobs=2)]
    tok, lp = sample(process_logits(logits, p, [[]]), p)
    ref = torch.log_softmax(logits, -1)[0]
    assert tok.tolist() == [1]
    torch.testing.assert_close(lp.token, ref[1:2])
    assert lp.top_ids.tolist() == [[1, 2]]
    torch.testing.assert_close(lp.top_values[0], ref[[1, 2]])


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                dict(min_p=2), dict(max_new_tokens=0), dict(repetition_penalty=0),
                                dict(presence_penalty=3), dict(temperature=float("nan")), dict(stop=[""]),
                                dict(max_new_tokens=1.5)])
def test_bad_values_raise(kw):
    with pytest.raises(Qwen2Error):
        SamplingParams(**kw)


def test_from_generation_config(tmp_path):
    gc = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
          "eos_token_id": [151645, 151643], "pad_token_id": 151643}
    (tmp_path / "generation_config.json").write_text(json.dumps(gc))
    p = SamplingParams.from_generation_config(tmp_path, max_new_tokens=10)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (0.7, 0.8, 20, 1.05, 10)
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.7}).temperature == 0
    assert SamplingParams.from_generation_config({"do_sample": True}).top_k == 50  # transformers' default
    assert SamplingParams.from_generation_config(tmp_path / "nothing").temperature == 0
    with pytest.raises(Qwen2Error):
        SamplingParams.from_generation_config({}, temprature=0.5)


def test_tiny_temperature_is_greedy_not_nan():
    """A temperature of 1e-300 (within OpenAI's 0..2) would overflow logits / t to inf and the
    probabilities to NaN, failing the whole engine step: it samples greedily instead, with or
    without top-k, in a batch with an ordinary sampled row."""
    from qwen2.engine.sampling import make_generator, process_logits, sample
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 5
    params = [SamplingParams(temperature=1e-300), SamplingParams(temperature=1e-300, top_k=1),
              SamplingParams(temperature=0.7, seed=1)]
    out = process_logits(logits.clone(), params, [[], [], []], [[1], [1], [1]])
    assert torch.isfinite(out[:2]).all()
    toks, _ = sample(out, params, [make_generator(p.seed, "cpu") for p in params])
    assert toks[:2].tolist() == logits[:2].argmax(-1).tolist()
