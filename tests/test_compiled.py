"""Compiled decode (qwen2.engine.compiled) against the eager path: same logits at the fast path's own
tolerance, same greedy tokens, across float dtypes, int8/int4 weights, padded batches and cache
lengths that cross attention-span blocks. Each test compiles a tiny model (a few seconds)."""
import copy
import json

import pytest
import torch

import qwen2
import qwen2.engine.compiled as compiled
from qwen2.engine import runner
from qwen2.engine.compiled import GemvLinear, compile_decode
from qwen2.engine.generate import generate
from qwen2.engine.paged import KVPool, PackedStep, SeqSlice
from qwen2.quant.linear import QuantLinear, pack_linears, quantize_model
from qwen2.engine.sampling import SamplingParams
from util import TINY_MOE, make_hf_checkpoint


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Small attention-span blocks, so a short test crosses several (new dynamic shapes).
    monkeypatch.setattr(compiled, "SLOT_BLOCK", 8)


def _steps(model, prompts, steps, pool_tokens=256):
    """Engine steps as the engine takes them: one packed prefill of every prompt, then `steps`
    greedy decode steps of all rows at once, through the runner (the compiled graph for decode
    steps when the model has one). Returns the logits [rows, steps + 1, V]."""
    pool = KVPool(model.config, pool_tokens // 4, 4, model.dtype)
    tables = [pool.allocator.allocate(pool.blocks_for(len(p) + steps + 1)) for p in prompts]
    seqs = [list(p) for p in prompts]
    slices = [SeqSlice(list(p), 0, t, True) for p, t in zip(prompts, tables)]
    out = []
    with torch.inference_mode():
        for i in range(steps + 1):
            logits = runner.forward(model, PackedStep(pool, slices), pool)
            out.append(logits)
            nxt = logits.argmax(-1).tolist()
            for s, n in zip(seqs, nxt):
                s.append(n)
            slices = [SeqSlice([s[-1]], len(s) - 1, t, True) for s, t in zip(seqs, tables)]
    return torch.stack(out, 1)


def _check(eager, comp, prompts, steps, tol):
    ref = _steps(eager, prompts, steps)
    got = _steps(comp, prompts, steps)
    # it really ran compiled, with one graph for every step and span (no recompiles, no fallback)
    assert comp.decode_step is not None and comp.decode_step.calls == steps
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, atol=tol * scale, rtol=tol)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def _graphs(comp) -> int:
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(comp.decode_step._paged_code))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_compiled_float_matches_eager(tiny_ckpt, dtype, tol):
    eager = qwen2.load_model(tiny_ckpt[1], dtype=dtype)
    comp = compile_decode(copy.deepcopy(eager))
    assert isinstance(comp.lm_head, GemvLinear) and comp.model.layers[0].self_attn.qkv_proj is not None
    ids = torch.randint(0, 512, (5,), generator=torch.Generator().manual_seed(0)).tolist()
    _check(eager, comp, [ids], 20, tol)  # 25 positions: spans of 8, 16, 24, 32 slots
    assert _graphs(comp) == 1


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quantized_matches_eager(tiny_ckpt, bits):
    eager = quantize_model(qwen2.load_model(tiny_ckpt[1], dtype="float32"), bits, 32)
    comp = compile_decode(copy.deepcopy(eager))
    assert isinstance(comp.model.layers[1].mlp.gate_up_proj, QuantLinear)
    ids = torch.randint(0, 512, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    _check(eager, comp, [ids], 12, 1e-4)


def test_compiled_generate_padded_batch_equals_eager(tiny_ckpt):
    """A left-padded batch of two (rows > 1: the matmul form) through generate(): same tokens."""
    eager = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    comp = compile_decode(copy.deepcopy(eager))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300, 301]]
    params = SamplingParams(max_new_tokens=14, temperature=0.0)
    ref = generate(eager, prompts, params)
    got = generate(comp, prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert comp.decode_step.calls > 0
    # and one prompt alone (batch 1: the multiply-sum form) gives the same tokens as in the batch
    alone = generate(comp, prompts[1:], params)
    assert alone[0].token_ids == ref[1].token_ids


def test_untraceable_models_stay_eager(tmp_path, capsys, tiny_ckpt):
    _, path = make_hf_checkpoint(tmp_path / "moe", TINY_MOE)
    moe = compile_decode(qwen2.load_model(path, dtype="float32"))
    assert moe.decode_step is None and "MoE" in capsys.readouterr().err
    packed = compile_decode(pack_linears(quantize_model(qwen2.load_model(tiny_ckpt[1], dtype="float32"), 4, 32)))
    assert packed.decode_step is None and "pre-packed" in capsys.readouterr().err


def test_compile_failure_falls_back_to_eager(tiny_ckpt, capsys):
    """No working compiler (say): the first step says so and decoding goes on eagerly."""
    eager = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    comp = compile_decode(copy.deepcopy(eager))

    def broken(*a, **k):
        raise RuntimeError("InductorError: no C++ compiler")
    comp.decode_step._paged_fn = broken
    ref = _steps(eager, [[1, 2, 3]], 4)
    got = _steps(comp, [[1, 2, 3]], 4)
    assert comp.decode_step is None and "decoding eagerly" in capsys.readouterr().err
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_model_changed_after_compile_decodes_eagerly(tiny_ckpt, capsys):
    """The traced step skips Dynamo's module guards (~1 ms a step); it checks the structure itself:
    a weight replaced after compiling must not be decoded with the stale graph."""
    eager = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    comp = compile_decode(copy.deepcopy(eager))
    _steps(comp, [[1, 2, 3]], 3)
    assert comp.decode_step.calls == 3
    for m in (eager, comp):  # the same new weight in both (comp's is fused, so its own layout)
        mlp = m.model.layers[1].mlp
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight * -2, requires_grad=False)
    ref = _steps(eager, [[1, 2, 3]], 4)
    got = _steps(comp, [[1, 2, 3]], 4)
    assert comp.decode_step is None and "changed after compile_decode" in capsys.readouterr().err
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_one_graph_for_any_pool_and_batch(tiny_ckpt):
    """Pools of any size, one row or several, spans of any length: the step is traced once for one
    row and once for several (a recompile would stall a generation for seconds)."""
    eager = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    comp = compile_decode(copy.deepcopy(eager))
    for prompts, steps, pool in [([[1, 2, 3]], 3, 64), ([[4, 5, 6, 7]], 20, 256), ([[1, 2], [3, 4, 5, 6, 7, 8]], 12, 128),
                                 ([[9] * 11, [8] * 3, [7]], 6, 96)]:
        ref = _steps(eager, prompts, steps, pool)
        got = _steps(comp, prompts, steps, pool)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert _graphs(comp) == 2


def test_cli_default_path_equals_eager(ckpt, llm):
    """The command line takes the fastest path by default, `--eager` none: the same greedy text as
    the eager API either way, and no fallback note."""
    from test_cli import qwen2_cmd
    want = llm.generate("Once upon a time", max_new_tokens=10, temperature=0)
    for flags in ([], ["--eager"]):
        r = qwen2_cmd("generate", "-m", ckpt, "--dtype", "float32", *flags, "--json", "--temperature", 0,
                      "--max-new-tokens", 10, "--prompt", "Once upon a time")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["token_ids"] == want.token_ids
        assert "eagerly" not in r.stderr


def test_hugepage_weights_keep_values_and_ties(tiny_ckpt):
    """Weights moved into the huge-page mapping: same tensors (ties kept), same logits."""
    from qwen2.kernels.memory import hugepage_weights
    m = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    ref = copy.deepcopy(m)
    params = {n: p for n, p in m.named_parameters()}
    moved = hugepage_weights(m, min_bytes=1)
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = "[never]" not in f.read()
    assert (moved > 0) == thp
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied: one Parameter, one storage
    assert all(p is params[n] for n, p in m.named_parameters())  # same Parameter objects
    if thp:
        addrs = {p.data_ptr() for p in m.parameters()}
        assert len(addrs) == len(list(m.parameters()))  # each tensor in its own aligned slot
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(m(ids), ref(ids))
    for (n, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
