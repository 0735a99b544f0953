"""Continuous-batching engine on token ids: packed paged-KV steps against plain forwards."""
from pathlib import Path

import pytest
import torch

import qwen2
from qwen2.engine.sampling import SamplingParams
from qwen2.engine.core import Engine
from qwen2.engine.paged import KVPool, PackedStep, SeqSlice
from util import TINY, make_hf_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, path = make_hf_checkpoint(tmp_path_factory.mktemp("eng"), TINY, seed=3, std=0.2)
    return qwen2.load_model(path, dtype="float32")


def greedy_reference(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


def run_step(model, pool, slices):
    """One packed engine step over `slices`: (the PackedStep, logits of its logit rows)."""
    step = PackedStep(pool, slices)
    with torch.no_grad():
        out = model(step.input_ids, position_ids=step.position_ids, cache=step,
                    logits_to_keep=step.num_logits)[0]
    return step, out


def test_packed_step_matches_plain_forward(model):
    """One packed step mixing a fresh prompt, a continued chunk and a decode token gives the same
    logits as running each sequence alone."""
    pool = KVPool(model.config, 32, 4, torch.float32)
    a, b, c = prompts(3, seed=1)
    blocks = {}

    def run(slices):
        return run_step(model, pool, slices)[1]

    for name, seq in (("a", a), ("b", b), ("c", c)):
        blocks[name] = pool.allocator.allocate(pool.blocks_for(len(seq) + 1))
    # step 1: b's first half (no logits) and all of c but its last token
    run([SeqSlice(b[:5], 0, blocks["b"], False), SeqSlice(c[:-1], 0, blocks["c"], True)])
    # step 2: all of a, the rest of b, c's last token (a decode-shaped row)
    got = run([SeqSlice(a, 0, blocks["a"], True), SeqSlice(b[5:], 5, blocks["b"], True),
               SeqSlice(c[-1:], len(c) - 1, blocks["c"], True)])
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([s]))[0, -1] for s in (a, b, c)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)



def test_decode_only_step_matches_plain_forward(model):
    """A step of decodes only (rows of different lengths, so the gathered keys are padded, and
    blocks scattered through the pool) gives each sequence's plain next-token logits."""
    pool = KVPool(model.config, 64, 4, torch.float32)
    seqs = prompts(4, seed=4)
    pool.allocator.allocate(3)  # blocks do not start at slot 0
    tables = []
    for seq in seqs:
        tables.append(pool.allocator.allocate(pool.blocks_for(len(seq))))
        pool.allocator.allocate(1)  # a gap between sequences

    def run(slices):
        return run_step(model, pool, slices)

    run([SeqSlice(seq[:-1], 0, t, False) for seq, t in zip(seqs, tables)])
    step, got = run([SeqSlice(seq[-1:], len(seq) - 1, t, True) for seq, t in zip(seqs, tables)])
    assert step.decode is not None and step.decode.q_index is None and step.decode.padded
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_prepared_model_engine_equals_plain_greedy(tmp_path_factory):
    """The serving transforms (fused projections, packed fp32 linears, the tied embedding read from
    the packed lm_head) keep greedy results: a batch through the engine on the prepared model
    equals unbatched greedy on the plain model."""
    from qwen2.engine.fast import F32Embedding, F32Linear, f32_supported, prepare_for_serving
    _, path = make_hf_checkpoint(tmp_path_factory.mktemp("prep"), TINY, seed=4, std=0.2)
    plain = qwen2.load_model(path, dtype="float32")
    fast = prepare_for_serving(qwen2.load_model(path, dtype="float32"))
    assert f32_supported(fast)
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert isinstance(fast.lm_head, F32Linear) and isinstance(fast.model.embed_tokens, F32Embedding)
    assert fast.model.embed_tokens.packed is fast.lm_head.packed  # the vocabulary matrix, once
    assert fast.dtype == torch.float32
    ids = torch.tensor([[5, 0, 511, 17]])
    assert torch.equal(fast.model.embed_tokens(ids), plain.model.embed_tokens(ids))
    # Nothing is left in the checkpoint's memory-mapped file (which would keep every page the
    # packing read resident).
    maps = Path("/proc/self/maps")
    if maps.exists():
        files = [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in maps.read_text().splitlines()
                 if line.endswith(".safetensors")]
        tensors = list(fast.named_parameters()) + list(fast.named_buffers())
        assert not [n for n, t in tensors if any(lo <= t.data_ptr() < hi for lo, hi in files)]
        # (the plain model, loaded the same way, does live there: the check can fail)
        assert [n for n, t in plain.named_parameters() if any(lo <= t.data_ptr() < hi for lo, hi in files)]
    ps = prompts(6, seed=8)
    refs = [greedy_reference(plain, p, 10) for p in ps]
    engine = Engine(fast, max_batch=6, max_model_len=64, block_size=4)
    outs = run_engine(engine, [(p, SamplingParams(max_new_tokens=10, temperature=0.0)) for p in ps])
    engine.run_until_done()
    assert [tokens(outs, str(i)) for i in range(6)] == refs


def test_engine_serves_dual_chunk_attention_one_at_a_time(tmp_path_factory):
    """DCA layers read positions across the whole row, so the engine gives them one sequence per
    step: requests sent together queue, each gets exactly its own greedy tokens (those of the
    static-cache reference, tests/test_longctx.py), and every block comes back."""
    from qwen2.engine.generate import generate
    from qwen2.model.longctx import enable_dual_chunk_attention
    _, path = make_hf_checkpoint(tmp_path_factory.mktemp("dca"), TINY, seed=1)
    m = enable_dual_chunk_attention(qwen2.load_model(path, dtype="float32"), chunk_size=16, local_size=4)
    engine = Engine(m, max_batch=8, max_model_len=64, block_size=4, max_batched_tokens=8)
    assert engine.max_batch == 1
    ps = prompts(3, seed=4)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    outs = run_engine(engine, [(p, params) for p in ps])
    engine.run_until_done()
    want = [generate(m, [p], params)[0].token_ids for p in ps]
    assert [tokens(outs, str(i)) for i in range(3)] == want
    assert engine.pool.allocator.num_free == engine.pool.num_blocks


def run_engine(engine, reqs):
    outs = {}

    def sink(rid):
        return lambda o: outs.setdefault(rid, []).append(o)
    for i, (p, params) in enumerate(reqs):
        engine.add_request(str(i), p, params, sink(str(i)))
    return outs


def tokens(outs, rid):
    return [t for o in outs[rid] for t in o.token_ids]


def test_engine_greedy_equals_unbatched_under_memory_pressure(model):
    """Staggered arrivals, chunked prefill, a KV pool too small for everyone (FIFO waiting and
    preemption): every request still gets exactly its unbatched greedy tokens, and every block
    comes back."""
    per_block = KVPool.bytes_per_block(model.config, 4, model.dtype)
    engine = Engine(model, max_batch=6, max_model_len=64, kv_cache_memory=20 * per_block, block_size=4,
                    max_batched_tokens=24)
    ps = prompts(10, seed=2)
    n_new = [5 + 3 * (i % 4) for i in range(10)]
    refs = [greedy_reference(model, p, n) for p, n in zip(ps, n_new)]
    outs = {}
    for i, (p, n) in enumerate(zip(ps, n_new)):
        engine.add_request(str(i), p, SamplingParams(max_new_tokens=n, temperature=0.0),
                           lambda o, i=i: outs.setdefault(str(i), []).append(o))
        for _ in range(i % 3):  # let some steps pass between arrivals
            engine.step()
    engine.run_until_done()
    for i in range(10):
        assert tokens(outs, str(i)) == refs[i], i
        last = outs[str(i)][-1]
        assert last.finished and last.finish_reason == "length" and last.completion_tokens == n_new[i]
        assert sum(o.finished for o in outs[str(i)]) == 1
    assert engine.stats.preemptions > 0
    assert engine.num_free_blocks == engine.pool.num_blocks
    assert engine.num_running == engine.num_waiting == 0


def test_engine_stop_ids_abort_and_seeded_sampling(model):
    engine = Engine(model, max_batch=4, max_model_len=64, block_size=4)
    p = prompts(1, seed=5)[0]
    ref = greedy_reference(model, p, 6)
    # A stop token id ends the request at its first occurrence (the id itself is returned).
    outs = run_engine(engine, [(p, SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[ref[2]]))])
    engine.run_until_done()
    got = tokens(outs, "0")
    assert got == ref[:ref.index(ref[2]) + 1] and outs["0"][-1].finish_reason == "stop"
    # Abort: the request ends with "abort" and its blocks return to the pool.
    outs = run_engine(engine, [(p, SamplingParams(max_new_tokens=50, temperature=0.0))])
    engine.step(), engine.step()
    engine.abort("0")
    engine.run_until_done()
    assert outs["0"][-1].finish_reason == "abort"
    assert engine.num_free_blocks == engine.pool.num_blocks
    # Seeded sampling is reproducible whatever shares the batch.
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    alone = run_engine(engine, [(p, sp)])
    engine.run_until_done()
    crowd = run_engine(engine, [(q, SamplingParams(max_new_tokens=8, temperature=1.0)) for q in prompts(3, 9)] + [(p, sp)])
    engine.run_until_done()
    assert tokens(alone, "0") == tokens(crowd, "3")


def test_engine_rejects_prompt_beyond_context(model):
    engine = Engine(model, max_model_len=16, block_size=4)
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("x", list(range(16)), SamplingParams(), lambda o: None)
