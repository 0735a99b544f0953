"""Speculative decoding (qwen2.engine.speculative) on the one engine: greedy output identical to
plain decoding token for token, sampled output distributed as the target's own (chi-square, with
a draft of a deliberately different distribution), prompt lookup against a brute-force search,
stop ids / limits / logprobs / streaming as without speculation, and the bad-input lines."""
from __future__ import annotations

import warnings

import pytest
import torch
from scipy.stats import chisquare

import qwen2
from qwen2.engine.core import Engine
from qwen2.engine.generate import generate, stream_generate
from qwen2.engine.paged import KVPool
from qwen2.engine.sampling import SamplingParams, process_logits
from qwen2.engine.speculative import (STEADY_CATCH_UP, DraftModel, Speculator, check_vocabularies, ngram_propose,
                                      speculator_for, verify)
from qwen2.errors import Qwen2Error
from util import TINY, make_hf_checkpoint


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target, other draft, transformers target): two tiny random models of one vocabulary."""
    from qwen2.engine.runner import prepare
    root = tmp_path_factory.mktemp("spec")
    hf, a = make_hf_checkpoint(root / "target", TINY, seed=0)
    _, b = make_hf_checkpoint(root / "draft", dict(TINY, num_hidden_layers=1), seed=1)
    target, draft = qwen2.load_model(a, dtype="float32"), qwen2.load_model(b, dtype="float32")
    prepare(target)
    prepare(draft)
    return target, draft, hf


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Random prompts, some with repeats so that prompt lookup finds n-grams in them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(0, TINY["vocab_size"], (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
        out.append(p * (1 + i % 3))
    return out


def run_engine(model, reqs, speculator=None, max_batch=16, max_batched_tokens=1024):
    """Run (prompt, params) requests on one engine; (token ids per request, stats, outputs).
    The speculator's measured policy is off: these tests are about what verification does."""
    if speculator is not None:
        speculator.adaptive = False
    need = KVPool.bytes_for(model.config, [len(p) + sp.max_new_tokens + 16 for p, sp in reqs], model.dtype)
    eng = Engine(model, eos_token_ids=(), max_batch=max_batch, kv_cache_memory=need, speculator=speculator,
                 max_batched_tokens=max_batched_tokens)
    outs = [[] for _ in reqs]
    for i, (p, sp) in enumerate(reqs):
        eng.add_request(str(i), p, sp, outs[i].append, check_waiting=False)
    eng.run_until_done()
    for o in outs:
        assert o[-1].finished and not o[-1].error, o[-1]
    return [[t for x in o for t in x.token_ids] for o in outs], eng.stats, outs


def draft_of(model, p_min=0.0):
    return DraftModel(model, p_min=p_min)


# ------------------------------------------------------------------------------- prompt lookup
def brute_ngram(tokens, k, n_max, n_min):
    for n in range(n_max, n_min - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for j in range(len(tokens) - n - 1, -1, -1):   # most recent earlier occurrence first
            if tokens[j:j + n] == suffix:
                return tokens[j + n:j + n + k]
    return []


def test_ngram_propose_examples():
    assert ngram_propose([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]
    assert ngram_propose([1, 2, 3, 9, 2, 3, 7, 2, 3], 2) == [7, 2]         # the most recent occurrence
    assert ngram_propose([5, 1, 2, 6, 2, 8, 1, 2], 1, n_max=2) == [6]      # the longest suffix wins
    assert ngram_propose([1, 2, 3], 4) == []
    assert ngram_propose([7, 7, 7, 7], 3) == [7]                           # continuation ends at the end
    assert ngram_propose([1, 2, 1], 5, n_max=3, n_min=2) == []             # n_min bounds it
    assert ngram_propose([4, 4], 0) == []


def test_ngram_propose_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    for _ in range(500):
        toks = torch.randint(0, 4, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        k, n_max = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        n_min = int(torch.randint(1, n_max + 1, (1,), generator=g))
        assert ngram_propose(toks, k, n_max, n_min) == brute_ngram(toks, k, n_max, n_min), (toks, k, n_max, n_min)


# ------------------------------------------------------------------------------- greedy: exact
@pytest.mark.parametrize("method", ["ngram", "draft", "self"])
@pytest.mark.parametrize("batch", [1, 4, 9])
def test_greedy_identical_to_plain(pair, method, batch):
    target, draft, _ = pair
    ps = prompts(12, seed=batch)
    sp = SamplingParams(temperature=0, max_new_tokens=40)
    plain, _, _ = run_engine(target, [(p, sp) for p in ps], max_batch=batch)
    spec = Speculator("ngram", 6, max_batch=16, budget=64) if method == "ngram" else \
        Speculator("draft", 4, draft_of(target if method == "self" else draft), max_batch=16, budget=64)
    fast, st, _ = run_engine(target, [(p, sp) for p in ps], spec, max_batch=batch)
    assert fast == plain
    assert st.spec_steps > 0 and st.spec_proposed > 0
    assert st.spec_accepted > (st.spec_proposed * 0.9 if method == "self" else 0)
    assert st.steps < sum(len(t) for t in plain) / batch + len(ps)   # drafts were accepted: fewer steps


def test_draft_vocabulary_cut(pair):
    """A draft scoring only the first ids: its logits are the full head's first rows (the same
    weights, not a copy), it never drafts a later id, and the output stays plain greedy's."""
    from qwen2.engine.speculative import _with_head_rows
    target, draft, _ = pair
    cut = _with_head_rows(draft, 256)
    assert draft.lm_head.out_features == 512 and cut.lm_head.out_features == 256
    assert cut.model is draft.model
    x = torch.randn(3, draft.config.hidden_size)
    with torch.inference_mode():
        assert torch.equal(cut.lm_head(x), draft.lm_head(x)[:, :256])
    ps = prompts(6, seed=21)
    sp = SamplingParams(temperature=0, max_new_tokens=30)
    plain, _, _ = run_engine(target, [(p, sp) for p in ps])
    dm = DraftModel(draft, p_min=0.0, vocab=256)
    seen = []
    propose = dm.propose
    dm.propose = lambda items, vocab: [seen.extend(p.tokens) or p for p in propose(items, vocab)]
    fast, st, _ = run_engine(target, [(p, sp) for p in ps], Speculator("draft", 4, dm, max_batch=16, budget=64))
    assert fast == plain and st.spec_proposed > 0
    assert seen and max(seen) < 256


def test_draft_checks_prompt_lookup_first(pair):
    """Greedy requests: the draft takes the prompt-lookup tokens its own argmax agrees with (one
    forward for several drafts); the output is plain greedy's with and without that."""
    target, draft, _ = pair
    ps = prompts(6, seed=4)
    sp = SamplingParams(temperature=0, max_new_tokens=30)
    plain, _, _ = run_engine(target, [(p, sp) for p in ps])
    for model in (target, draft):
        outs = []
        for lookup in (True, False):
            dm = DraftModel(model, p_min=0.0, lookup=lookup)
            fast, st, _ = run_engine(target, [(p, sp) for p in ps], Speculator("draft", 5, dm, max_batch=16, budget=64))
            assert fast == plain and st.spec_proposed > 0
            outs.append((dm.lookup_tokens, st.steps))
        assert outs[0][0] > 0 and outs[1][0] == 0
        if model is target:   # the self-draft agrees with every token: the same steps either way
            assert outs[0][1] == outs[1][1]


def test_greedy_with_penalties_stop_ids_and_limits(pair):
    """Repetition/presence penalties see the accepted drafts as history; a stop id or the length
    limit inside a run of accepted drafts ends the request there, as in plain decoding."""
    target, _, _ = pair
    ps = prompts(8, seed=11)
    plain_out, _, _ = run_engine(target, [(p, SamplingParams(temperature=0, max_new_tokens=40)) for p in ps])
    reqs = []
    for i, p in enumerate(ps):
        kw = dict(temperature=0, max_new_tokens=5 + 3 * i)
        if i % 3 == 0:
            kw.update(repetition_penalty=1.3, presence_penalty=0.5)
        if i % 3 == 1 and len(plain_out[i]) > 6:
            kw["stop_token_ids"] = [plain_out[i][6]]   # a token the output reaches mid-run
        reqs.append((p, SamplingParams(**kw)))
    plain, _, _ = run_engine(target, reqs)
    for spec in (Speculator("ngram", 8), Speculator("draft", 5, draft_of(target))):
        out, st, _ = run_engine(target, reqs, spec)
        assert out == plain and st.spec_accepted > 0
    for o, (_, sp) in zip(plain, reqs):
        assert len(o) <= sp.max_new_tokens


def test_logprobs_as_plain(pair):
    target, _, _ = pair
    ps = prompts(4, seed=5)
    sp = SamplingParams(temperature=0, max_new_tokens=24, logprobs=True, top_logprobs=3)
    plain, _, po = run_engine(target, [(p, sp) for p in ps])
    out, st, so = run_engine(target, [(p, sp) for p in ps], Speculator("draft", 4, draft_of(target)))
    assert out == plain and st.spec_accepted > 0
    a = [lp for o in po for x in o for lp in x.logprobs]
    b = [lp for o in so for x in o for lp in x.logprobs]
    assert len(a) == len(b) == sum(len(t) for t in plain)
    for x, y in zip(a, b):
        assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
        assert abs(x.logprob - y.logprob) < 1e-4
        assert max(abs(u - v) for (_, u), (_, v) in zip(x.top, y.top)) < 1e-4


def test_stop_strings_and_streaming(llm):
    """Real tokenizer: stop strings cut, text streamed in deltas, equal to plain decoding."""
    ids = llm.tokenizer.encode("def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return")
    for stop in ([], ["a +"], ["\n"]):
        sp = SamplingParams(temperature=0, max_new_tokens=30, stop=stop)
        plain = generate(llm.model, [ids], sp, llm.tokenizer, llm.eos_token_ids)[0]
        spec = Speculator("draft", 4, DraftModel(llm.model, llm.tokenizer, p_min=0.0))
        deltas = list(stream_generate(llm.model, [ids], sp, llm.tokenizer, llm.eos_token_ids, speculator=spec))
        done = deltas[-1].completion
        assert done.token_ids == plain.token_ids and done.text == plain.text
        assert "".join(d.text for d in deltas) == plain.text
        assert done.finish_reason == plain.finish_reason and done.stop_reason == plain.stop_reason


# ------------------------------------------------------------------------------- sampling: the target's distribution
def test_verify_rule_distribution():
    """The first emitted token is distributed as p_1, and given a second one, that as p_2, for a
    draft q far from p (random tables, 6 tokens, 3 drafts)."""
    torch.manual_seed(0)
    v, k, n = 6, 3, 15000
    p_logits = torch.randn(k + 1, v) * 1.5
    q = torch.softmax(torch.randn(k, v) * 1.5, -1)
    q[:, 0] = 0.0   # the draft never proposes token 0, which the target may pick
    q = q / q.sum(-1, keepdim=True)
    g = torch.Generator().manual_seed(1)
    firsts, seconds = torch.zeros(v), torch.zeros(v)
    draws = torch.multinomial(q, n, replacement=True, generator=g).T   # [n, k]
    for d in draws.tolist():
        out = verify(p_logits, d, q, greedy=False, generator=g)
        firsts[out[0]] += 1
        if len(out) > 1:
            seconds[out[1]] += 1
    p = torch.softmax(p_logits, -1)
    for obs, probs in ((firsts, p[0]), (seconds, p[1])):
        assert chisquare(obs.numpy(), (probs * obs.sum()).numpy()).pvalue > 1e-3, (obs, probs)


def test_verify_rule_deterministic_draft():
    """Prompt lookup's drafts (q one-hot): still exactly p."""
    torch.manual_seed(2)
    v, n = 5, 12000
    p_logits = torch.randn(3, v)
    g = torch.Generator().manual_seed(3)
    firsts, seconds = torch.zeros(v), torch.zeros(v)
    for _ in range(n):
        out = verify(p_logits, [1, 3], None, greedy=False, generator=g)
        firsts[out[0]] += 1
        if len(out) > 1:
            seconds[out[1]] += 1
    p = torch.softmax(p_logits, -1)
    assert chisquare(firsts.numpy(), (p[0] * n).numpy()).pvalue > 1e-3
    assert chisquare(seconds.numpy(), (p[1] * seconds.sum()).numpy()).pvalue > 1e-3


def test_engine_sampling_matches_target_distribution(pair):
    """End to end: 3 tokens per request, top-k 4 (the draft's candidates mostly differ from the
    target's); the joint distribution of the first two tokens equals the target's, computed with
    transformers."""
    target, draft, hf = pair
    prompt = [3, 17, 100, 42, 7]
    sp = SamplingParams(temperature=1.0, top_k=4, max_new_tokens=3)
    n = 1000
    reqs = [(prompt, sp.replace(seed=i)) for i in range(n)]
    dm = DraftModel(draft, p_min=0.0, vocab=256)   # the draft's head cut: q is its own distribution
    out, st, _ = run_engine(target, reqs, Speculator("draft", 3, dm, max_batch=n, budget=3 * n),
                            max_batch=n, max_batched_tokens=8 * n)
    assert st.spec_steps >= n and 0 < st.spec_accepted < st.spec_proposed
    with torch.no_grad():
        p1 = torch.softmax(process_logits(hf(torch.tensor([prompt])).logits[0, -1:], [sp], [[]])[0], -1)
        firsts = p1.nonzero()[:, 0].tolist()
        ctx = torch.tensor([prompt + [t] for t in firsts])
        p2 = torch.softmax(process_logits(hf(ctx).logits[:, -1], [sp] * len(firsts), [[t] for t in firsts]), -1)
    cells, expected = {}, {}
    for i, t in enumerate(firsts):
        for u in p2[i].nonzero()[:, 0].tolist():
            expected[(t, u)] = float(p1[t] * p2[i, u]) * n
            cells[(t, u)] = 0
    for o in out:
        assert (o[0], o[1]) in cells, "a token outside the target's top-k"
        cells[(o[0], o[1])] += 1
    keys = sorted(cells)
    assert chisquare([cells[c] for c in keys], [expected[c] for c in keys]).pvalue > 1e-3


# ------------------------------------------------------------------------------- policy and bad input
def test_policy_turns_speculation_down_with_the_batch():
    spec = Speculator("draft", 5, draft=object(), max_batch=4)
    assert [spec.tokens_per_request(b) for b in (1, 2, 3, 4, 5, 16)] == [5, 5, 3, 2, 0, 0]


def test_bad_input_is_one_line(pair, llm, tmp_path):
    target, draft, _ = pair
    with pytest.raises(Qwen2Error, match="positive integer"):
        Speculator("ngram", 0)
    with pytest.raises(Qwen2Error, match="positive integer"):
        speculator_for("ngram", num_draft_tokens=-2)
    with pytest.raises(Qwen2Error, match="must be one of"):
        speculator_for("beam")
    with pytest.raises(Qwen2Error, match="takes no --draft-model"):
        speculator_for("ngram", draft_model=draft)
    with pytest.raises(Qwen2Error, match="needs --draft-model"):
        speculator_for(None, num_draft_tokens=4)
    # a vocabulary of another size, and one of equal size with other tokens
    with pytest.raises(Qwen2Error, match="vocabulary of 512 ids"):
        speculator_for(None, draft, target=llm.model)
    other = qwen2.load(llm.source, dtype="float32")
    other.tokenizer._bytes[1000] = b"not the same"
    with pytest.raises(Qwen2Error, match="token 1000"):
        check_vocabularies(llm.tokenizer, other.tokenizer, llm.model.config, other.model.config)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        speculator_for(None, target, target=draft)
    assert any("not smaller than the target" in str(x.message) for x in w)


def test_load_with_speculation(ckpt, llm):
    """qwen2.load(draft_model=..., speculative=...): the same text as the plain LLM."""
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):"
    plain = llm.generate(prompt, max_new_tokens=24, temperature=0)
    for kw in (dict(draft_model=ckpt, num_draft_tokens=3), dict(speculative="ngram")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the self-draft is not smaller than the target
            fast = qwen2.load(ckpt, dtype="float32", **kw)
        assert fast.speculator is not None
        out = fast.generate(prompt, max_new_tokens=24, temperature=0)
        assert out.token_ids == plain.token_ids and out.text == plain.text
        assert "".join(fast.stream(prompt, max_new_tokens=24, temperature=0)) == plain.text


def test_cli_generate_with_speculation(ckpt, llm, capsys):
    import json
    from qwen2.cli import main
    prompt = "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2,"
    want = llm.generate(prompt, max_new_tokens=12, temperature=0)
    for flags in (["--speculative", "ngram"], ["--draft-model", str(ckpt), "--num-draft-tokens", "3"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the self-draft is not smaller than the target
            rc = main(["generate", "-m", str(ckpt), "--dtype", "float32", "-p", prompt, "--json",
                       "--max-new-tokens", "12", "--temperature", "0", *flags])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert json.loads(out.out)["token_ids"] == want.token_ids
    assert main(["generate", "-m", str(ckpt), "-p", "hi", "--speculative", "ngram", "--num-draft-tokens", "0"]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--num-draft-tokens" in err


def test_server_metrics_show_speculation(llm):
    """A server engine with prompt lookup: the completion equals offline greedy, /metrics counts
    the verification steps and shows the policy."""
    from prometheus_client.parser import text_string_to_metric_families
    from starlette.testclient import TestClient
    from qwen2.serve.app import build_app
    spec = Speculator("ngram", 6)
    engine = Engine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=256, max_batch=8,
                    speculator=spec)
    prompt = "a b c d e f a b c d e f a b c"
    want = llm.generate(prompt, max_new_tokens=20, temperature=0)
    with TestClient(build_app(engine, llm.tokenizer, "tiny", defaults=llm.defaults)) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want.text
        fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    val = lambda name: fams[name].samples[0].value
    st = engine.stats
    assert val("qwen2_spec_verify_steps") == st.spec_steps > 0
    assert val("qwen2_spec_acceptance_rate") == pytest.approx(st.spec_accepted / st.spec_proposed)
    assert val("qwen2_spec_tokens_per_verify_step") == pytest.approx(st.spec_emitted / st.spec_steps)
    assert val("qwen2_spec_max_batch") == spec.max_batch and val("qwen2_spec_draft_tokens_per_request") == 0


def test_measured_policy_keeps_the_faster_mode():
    """Synthetic step times: when verification loses, few steps after the first ones speculate,
    and fewer as the probe keeps losing; when it wins, nearly all do; a change is followed."""
    def run(spec, steps, spec_cost, spec_tokens, batch=1):
        modes = []
        for _ in range(steps):
            k = spec.begin_step(batch, decode_only=True)
            rates, mode, t0 = spec._step
            modes.append(mode)
            cost, tokens = (spec_cost, spec_tokens) if k else (1.0, batch)
            spec._step = (rates, mode, t0 - cost)   # as if the step took `cost` seconds
            spec.end_step(tokens)
        return modes
    spec = Speculator("ngram", 5)
    losing = run(spec, 600, spec_cost=3.0, spec_tokens=2)
    assert losing[:4] == ["spec"] * 4 and losing.count("spec") < 4 + 2 * 7
    assert losing[300:].count("spec") <= 2 * 2
    winning = run(Speculator("ngram", 5), 300, spec_cost=1.2, spec_tokens=4)
    assert winning[8:].count("plain") <= 2 * 300 / 16
    later = run(spec, 2000, spec_cost=1.2, spec_tokens=4)   # the workload turned: speculation now pays
    assert later[-200:].count("spec") > 180


def test_measured_policy_does_not_time_the_drafts_catch_up():
    """A drafting step whose draft model first caught up on many tokens (a new prompt, or the
    tokens decoded while speculation was off) is not timed: with that cost counted, a speculation
    that wins 1.5x in steady steps lost its warm-up and every probe and stayed off."""
    class Draft:           # stands in for DraftModel: only what the policy reads
        last_catch_up = 0
    spec = Speculator("draft", 5, Draft())
    modes, caught_up = [], True
    for _ in range(400):
        k = spec.begin_step(1, decode_only=True)
        rates, mode, t0 = spec._step
        modes.append(mode)
        if k:   # a drafting step: 2 s (+ 20 s when catching up) for 3 tokens; plain: 1 s a token
            spec.draft.last_catch_up = 50 if caught_up else STEADY_CATCH_UP
            cost, tokens, caught_up = (22.0 if caught_up else 2.0), 3, False
        else:
            cost, tokens, caught_up = 1.0, 1, True   # the draft falls behind
        spec._step = (rates, mode, t0 - cost)
        spec.end_step(tokens)
    assert modes[-300:].count("spec") > 280
    assert spec._rates[1].obs["spec"] and all(abs(s - 2.0) < 0.5 for s, _ in spec._rates[1].obs["spec"])
    # ... but a draft that catches up at every step (requests joining all the time) is timed as it
    # is after a few steps, and a speculation that then loses turns off
    spec, modes = Speculator("draft", 5, Draft()), []
    spec.draft.last_catch_up = 50
    for _ in range(400):
        k = spec.begin_step(1, decode_only=True)
        rates, mode, t0 = spec._step
        modes.append(mode)
        spec._step = (rates, mode, t0 - (22.0 if k else 1.0))
        spec.end_step(3 if k else 1)
    assert modes[-300:].count("spec") < 60   # its probes only (with every step untimed: all 300)


def test_serve_builds_a_speculating_engine(ckpt):
    """`qwen2 serve --speculative ngram` (as build_server builds it): the server's engine speculates."""
    from qwen2.cli import build_parser
    from qwen2.cli.serve import build_server
    args = build_parser().parse_args(["serve", "-m", str(ckpt), "--dtype", "float32", "--speculative", "ngram",
                                      "--num-draft-tokens", "4", "--max-model-len", "256"])
    engine, _ = build_server(args)
    assert engine.spec is not None and engine.spec.method == "ngram" and engine.spec.k == 4
