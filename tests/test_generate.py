"""qwen2.engine.generate against transformers' generate on random-weight checkpoints."""
import codecs

import pytest
import torch
from util import TINY, TINY_MOE, make_hf_checkpoint

import qwen2
from qwen2.errors import Qwen2Error
from qwen2.engine.generate import generate, stream_generate
from qwen2.engine.sampling import SamplingParams

CONFIGS = {
    "tiny": TINY,
    "mha-untied": dict(TINY, num_key_value_heads=4, tie_word_embeddings=False, num_hidden_layers=3),
    "moe": TINY_MOE,
}
PROMPTS = [[5, 17, 300, 42, 7, 99, 1, 250], [11, 12], [400, 3, 3, 8, 150]]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf, path = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), CONFIGS[request.param], seed=3)
    return hf, qwen2.load_model(path, dtype="float32")


def hf_greedy(hf, prompts, n, eos=None, **kw):
    """transformers' greedy generate on a left-padded batch; returns each row's new ids, cut after
    its first eos (transformers pads finished rows)."""
    t = max(map(len, prompts))
    ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                      pad_token_id=0, **kw)[:, t:].tolist()
    if eos is not None:
        out = [r[:r.index(eos) + 1] if eos in r else r for r in out]
    return out


def test_greedy_matches_transformers_single_and_batch(pair):
    hf, model = pair
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    for prompts in ([PROMPTS[0]], PROMPTS):
        got = generate(model, prompts, greedy)
        assert [c.token_ids for c in got] == hf_greedy(hf, prompts, 12)
        assert all(c.finish_reason == "length" for c in got)


def test_rows_stop_on_their_own_eos(pair):
    hf, model = pair
    free = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    eos = free[0].token_ids[4]  # a token row 0 really produces, so at least one row stops early
    got = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=12), eos_ids=[eos])
    want = hf_greedy(hf, PROMPTS, 12, eos=eos)
    assert [c.token_ids for c in got] == want
    assert got[0].finish_reason == "stop" and got[0].stop_reason == eos and len(got[0].token_ids) <= 5
    for c in got:
        assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")


def test_repetition_penalty_matches_transformers(pair):
    hf, model = pair
    got = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=10, repetition_penalty=1.5))
    assert [c.token_ids for c in got] == hf_greedy(hf, PROMPTS, 10, repetition_penalty=1.5)


def test_greedy_logprobs_match_transformers_scores(tiny_ckpt):
    hf, path = tiny_ckpt
    model = qwen2.load_model(path, dtype="float32")
    prompt = torch.tensor([PROMPTS[0]])
    out = hf.generate(prompt, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0)
    c = generate(model, [PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=5, top_logprobs=3))[0]
    for step, lp in enumerate(c.logprobs):
        ref = torch.log_softmax(out.logits[step][0].float(), -1)
        assert lp.token_id == out.sequences[0, prompt.shape[1] + step].item()
        assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-4
        vals, ids = ref.topk(3)
        assert [i for i, _ in lp.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), vals, atol=1e-4, rtol=0)


def test_seed_reproducible_whatever_the_batch(tiny_ckpt):
    model = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    p = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=15, seed=42)
    alone = generate(model, [PROMPTS[1]], p)[0].token_ids
    again = generate(model, [PROMPTS[1]], p)[0].token_ids
    other = SamplingParams(temperature=1.2, max_new_tokens=3, seed=7)
    in_batch = generate(model, [PROMPTS[0], PROMPTS[1]], [other, p])[1].token_ids
    assert alone == again == in_batch
    assert generate(model, [PROMPTS[1]], p.replace(seed=43))[0].token_ids != alone


def test_per_row_max_new_tokens(tiny_ckpt):
    model = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (3, 9, 1)]
    got = generate(model, PROMPTS, params)
    assert [len(c.token_ids) for c in got] == [3, 9, 1]
    full = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=9))
    for c, f in zip(got, full):  # a shorter budget is a prefix of the longer run
        assert f.token_ids[:len(c.token_ids)] == c.token_ids


class AsciiTokenizer:
    """A test tokenizer for the 512-token random model: ids < 256 are one printable character,
    ids >= 256 two characters, so tokens have different widths. Decoding is incremental UTF-8."""

    def piece(self, i):
        a = chr(32 + i % 95)
        return (a + chr(32 + (i * 7) % 95) if i >= 256 else a).encode()

    def stream_decoder(self, skip_special_tokens=False):
        tok = self

        class Dec:
            def __init__(self):
                self.d = codecs.getincrementaldecoder("utf-8")("replace")

            def feed(self, i):
                return self.d.decode(tok.piece(i))

            def flush(self):
                return self.d.decode(b"", final=True)
        return Dec()


def test_stop_strings_cut_exactly_across_tokens(tiny_ckpt):
    model = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    tok = AsciiTokenizer()
    base = SamplingParams(temperature=0, max_new_tokens=30)
    full = generate(model, [PROMPTS[0]], base, tokenizer=tok)[0]
    pieces = [tok.piece(i).decode() for i in full.token_ids]
    assert full.text == "".join(pieces)
    # A stop string made of the end of token 5 and the start of token 6 (crossing the boundary).
    pos = sum(map(len, pieces[:6]))
    stop = full.text[pos - 1:pos + 1]
    first = full.text.index(stop)
    for params in (base.replace(stop=[stop]), base.replace(stop=["never-there", stop])):
        deltas = list(stream_generate(model, [PROMPTS[0]], params, tokenizer=tok))
        c = deltas[-1].completion
        assert c.text == full.text[:first]
        assert "".join(d.text for d in deltas) == c.text  # the stream never shows the stop string
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.token_ids == full.token_ids[:len(c.token_ids)]
        assert len("".join(pieces[:len(c.token_ids)])) >= first + len(stop)  # stopped at the token completing it
        assert len("".join(pieces[:len(c.token_ids) - 1])) < first + len(stop)


def test_bad_prompts_are_clear_errors(tiny_ckpt):
    model = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    with pytest.raises(Qwen2Error, match="empty"):
        generate(model, [[]], SamplingParams())
    with pytest.raises(Qwen2Error, match="outside the vocabulary"):
        generate(model, [[1, 9999]], SamplingParams())
    with pytest.raises(Qwen2Error, match="context"):
        generate(model, [[1] * 5000], SamplingParams())
    model.config.max_position_embeddings = 10 ** 12  # a request whose KV cache cannot be allocated
    with pytest.raises(Qwen2Error, match="out of memory"):
        generate(model, [[1]], SamplingParams(max_new_tokens=10 ** 11))
