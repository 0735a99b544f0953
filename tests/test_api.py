"""qwen2.load / LLM against transformers (model + tokenizer) on a random-weight checkpoint that
carries the real Qwen vocabulary."""
import pytest
import torch

import qwen2
from qwen2.errors import Qwen2Error


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(ckpt)


def hf_generate(hf, ids, n, **kw):
    """transformers with the checkpoint's own generation_config (greedy, repetition penalty 1.1)."""
    model, _ = hf
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, **kw)[0, len(ids):].tolist()
    return out


def test_load_reads_generation_config(llm):
    assert llm.defaults.temperature == 0 and llm.defaults.repetition_penalty == 1.1
    assert llm.eos_token_ids == [151645, 151643]


def test_generate_text_matches_transformers(llm, hf):
    prompt = "The capital of France is"
    c = llm.generate(prompt, max_new_tokens=10)
    ids = hf[1](prompt)["input_ids"]
    assert c.prompt_token_ids == ids
    want = hf_generate(hf, ids, 10)
    assert c.token_ids == want
    assert c.text == hf[1].decode(want, skip_special_tokens=True)
    assert c.finish_reason == "length"
    assert c.timings["completion_tokens"] == 10 and c.timings["prefill_s"] > 0


def test_batch_and_token_id_prompts(llm, hf):
    prompts = ["Hello", "A much longer prompt, with several more tokens in it."]
    batch = llm.generate(prompts, max_new_tokens=6)
    assert [c.token_ids for c in batch] == [llm.generate(p, max_new_tokens=6).token_ids for p in prompts]
    ids = hf[1](prompts[1])["input_ids"]
    assert llm.generate(ids, max_new_tokens=6).token_ids == batch[1].token_ids
    assert llm.generate([ids, ids], max_new_tokens=2)[1].token_ids == batch[1].token_ids[:2]


def test_stream_concatenates_to_the_text(llm):
    s = llm.stream("Once upon a time", max_new_tokens=12)
    pieces = list(s)
    assert "".join(pieces) == s.completion.text == llm.generate("Once upon a time", max_new_tokens=12).text
    assert len(pieces) > 1


def test_chat_messages_use_the_template(llm, hf):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    c = llm.chat(messages, max_new_tokens=8)
    want = hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert c.prompt_token_ids == list(want)
    assert c.token_ids == hf_generate(hf, c.prompt_token_ids, 8)
    s = llm.chat(messages, max_new_tokens=8, stream=True)
    assert "".join(s) == c.text == s.completion.text


def test_seed_004_chat_call(llm, hf):
    response, history = llm.chat(None, "你好", history=None, max_new_tokens=5)
    assert history == [("你好", response)]
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你好"}]
    ids = hf[1].apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert response == hf[1].decode(hf_generate(hf, list(ids), 5), skip_special_tokens=True)

    response2, history2 = llm.chat(llm.tokenizer, "给这个故事起一个标题", history=history, system="Be nice.",
                                   max_new_tokens=5)
    assert history == [("你好", response)]  # the caller's list is not modified
    assert history2 == [("你好", response), ("给这个故事起一个标题", response2)]
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": response}, {"role": "user", "content": "给这个故事起一个标题"}]
    ids = hf[1].apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert response2 == hf[1].decode(hf_generate(hf, list(ids), 5), skip_special_tokens=True)
    assert list(llm.chat_stream(None, "你好", max_new_tokens=5))[-1] == response


def test_overrides_and_errors(llm):
    a = llm.generate("x", temperature=1.0, seed=3, max_new_tokens=8)
    assert a.token_ids == llm.generate("x", temperature=1.0, seed=3, max_new_tokens=8).token_ids
    with pytest.raises(Qwen2Error, match="unknown sampling"):
        llm.generate("x", temprature=1.0)
    with pytest.raises(Qwen2Error):
        llm.generate("x", top_p=2)
    with pytest.raises(Qwen2Error):
        qwen2.load("/no/such/dir")
