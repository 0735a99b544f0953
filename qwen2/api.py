"""The Python API: `qwen2.load()` -> an `LLM` that generates, streams and chats.

    llm = qwen2.load("Qwen/Qwen2-0.5B-Instruct")             # dir, .gguf file or hub id
    llm.generate("The capital of France is", max_new_tokens=8).text
    for piece in llm.stream("Once upon a time"): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi!"}]).text        # OpenAI-style messages
    response, history = llm.chat(None, "你好", history=None)   # Qwen-1.8B-Chat's model-card style

Sampling defaults come from the checkpoint's generation_config.json (greedy when there is none,
as in transformers); every SamplingParams field can be overridden per call by keyword.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator, Sequence

import torch

from qwen2.errors import Qwen2Error
from qwen2.engine.generate import generate, stream_generate
from qwen2.engine.request import Completion, Delta
from qwen2.engine.sampling import SamplingParams

DEFAULT_SYSTEM = "You are a helpful assistant."


class TextStream:
    """Iterator of text deltas; `.completion` holds the full result once the stream is done."""

    def __init__(self, deltas: Iterator[Delta]):
        self._deltas = deltas
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for d in self._deltas:
            if d.completion is not None:
                self.completion = d.completion
            if d.text:
                yield d.text

    def close(self):
        """Stop generating (frees the cache); safe to call at any time."""
        self._deltas.close()


class LLM:
    """A model, its tokenizer and its default sampling parameters."""

    def __init__(self, model, tokenizer, defaults: SamplingParams | None = None, eos_token_ids=None,
                 source: str | None = None, mode: str = "eager", speculator=None):
        self.model, self.tokenizer = model, tokenizer
        self.defaults = defaults or SamplingParams(temperature=0)
        ids = eos_token_ids if eos_token_ids is not None else tokenizer.stop_token_ids
        self.eos_token_ids = list(dict.fromkeys(int(i) for i in ids))
        self.source = source
        self.mode = mode  # the speed path the model was prepared with (qwen2.engine.runner.prepare)
        self.speculator = speculator  # qwen2.engine.speculative.Speculator, or None

    def __repr__(self):
        c = self.model.config
        return (f"LLM({self.source or c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"dtype={str(self.model.dtype).removeprefix('torch.')}, device={self.model.device})")

    # ---- plumbing ----------------------------------------------------------------------------
    def params(self, sampling_params: SamplingParams | None = None, **overrides) -> SamplingParams:
        return (sampling_params or self.defaults).replace(**overrides)

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise Qwen2Error(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}")

    def _deltas(self, ids: list[list[int]], params, eos=None) -> Iterator[Delta]:
        return stream_generate(self.model, ids, params, self.tokenizer, eos or self.eos_token_ids,
                               speculator=self.speculator)

    @property
    def chat_stop_ids(self) -> list[int]:
        """A reply ends at eos or at any ChatML marker, even where generation_config names only
        <|endoftext|> (base models, Qwen-1.8B-Chat: its chat() stops on these too)."""
        specials = getattr(self.tokenizer, "special_tokens", {})
        marks = [specials[t] for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>") if t in specials]
        return list(dict.fromkeys(self.eos_token_ids + marks))

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | None = None, **overrides):
        """Complete a prompt (str or token ids) -> Completion, or a list of them -> list[Completion].
        Prompts of a list run as one batch; each stops on its own."""
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and len(prompts) > 0
                                              and all(isinstance(t, int) for t in prompts))
        batch = [prompts] if single else list(prompts)
        if not batch:
            return []
        params = self.params(sampling_params, **overrides)
        out = generate(self.model, [self._ids(p) for p in batch], params, self.tokenizer, self.eos_token_ids,
                       speculator=self.speculator)
        return out[0] if single else out

    def stream(self, prompt, sampling_params: SamplingParams | None = None, **overrides) -> TextStream:
        """Iterator of text deltas for one prompt (str or token ids)."""
        return TextStream(self._deltas([self._ids(prompt)], self.params(sampling_params, **overrides)))

    # ---- chat --------------------------------------------------------------------------------
    def chat(self, messages, query: str | None = None, history=None, system: str | None = None, *,
             stream: bool = False, tools=None, sampling_params: SamplingParams | None = None, **overrides):
        """Two call styles:

        - `llm.chat(messages, **sampling)`: OpenAI-style [{"role": ..., "content": ...}] rendered
          by the checkpoint's chat template -> Completion (the reply is `.text`); with
          `stream=True`, a TextStream of deltas.
        - `response, history = llm.chat(tokenizer_or_None, query, history=None, system=...)`, as
          Qwen-1.8B-Chat's `model.chat`: history is a list of (query, response) pairs.
        """
        if isinstance(query, str) and (messages is None or hasattr(messages, "encode")):
            return self._chat_first_generation(messages, query, history, system, sampling_params, **overrides)
        if query is not None or history is not None:
            raise Qwen2Error("chat takes either messages, or (tokenizer_or_None, query, history=..., system=...)")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, (list, tuple)):
            raise Qwen2Error(f"chat messages must be a list of {{'role', 'content'}} dicts, not {type(messages).__name__}")
        if system is not None:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
        ids = self.tokenizer.encode_chat(list(messages), add_generation_prompt=True, tools=tools)
        params = self.params(sampling_params, **overrides)
        if stream:
            return TextStream(self._deltas([ids], params, self.chat_stop_ids))
        return generate(self.model, [ids], params, self.tokenizer, self.chat_stop_ids, speculator=self.speculator)[0]

    def _first_generation_ids(self, tokenizer, query, history, system) -> list[int]:
        tok = tokenizer or self.tokenizer
        system = DEFAULT_SYSTEM if system is None else system
        if getattr(tok, "first_generation", False):
            from qwen2.text.chat_template import make_context
            return make_context(tok, query, history, system)[1]
        messages = [{"role": "system", "content": system}]
        for q, r in history or []:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        messages.append({"role": "user", "content": query})
        return tok.encode_chat(messages, add_generation_prompt=True)

    def _chat_first_generation(self, tokenizer, query, history, system, sampling_params, **overrides):
        ids = self._first_generation_ids(tokenizer, query, history, system)
        reply = generate(self.model, [ids], self.params(sampling_params, **overrides), self.tokenizer,
                         self.chat_stop_ids, speculator=self.speculator)[0].text
        history = copy.deepcopy(list(history or []))
        history.append((query, reply))
        return reply, history

    def chat_stream(self, tokenizer, query: str, history=None, system: str | None = None,
                    sampling_params: SamplingParams | None = None, **overrides) -> Iterator[str]:
        """Qwen-1.8B-Chat's `chat_stream`: yields the response so far, growing with each token."""
        ids = self._first_generation_ids(tokenizer, query, history, system)
        text = ""
        for piece in TextStream(self._deltas([ids], self.params(sampling_params, **overrides), self.chat_stop_ids)):
            text += piece
            yield text


def load(path_or_id=None, dtype="auto", device="cpu", mode: str = "auto", adapter=None, *,
         draft_model=None, speculative: str | None = None, num_draft_tokens: int | None = None) -> LLM:
    """Load model + tokenizer + generation defaults from a checkpoint dir, a .gguf file or a hub
    id (None: the embedded demo model, when installed). mode: the speed passes
    (qwen2.engine.runner.prepare): "auto" picks the fastest path for the machine, "eager" none.
    adapter: a LoRA adapter directory (PEFT's format, e.g. from `qwen2 finetune`), merged into
    float weights so that generation runs at the base model's speed; over quantized weights (a
    `qwen2 quantize` checkpoint, a GGUF file at its own precision) it stays a LoRA beside them.
    Speculative decoding (docs/speculative.md): draft_model (a path, hub id, or a loaded LLM of the
    same vocabulary) drafts num_draft_tokens (default 5) tokens per step; speculative="ngram"
    drafts by prompt lookup (default 10). Greedy output is unchanged, sampled output keeps its
    distribution."""
    from qwen2.engine.runner import prepare
    from qwen2.io.hub import resolve
    from qwen2.io.load import load_model, load_tokenizer
    from qwen2.io.demo import model_or_demo
    from qwen2.model.tp import parallelize, tp_rank_world
    from qwen2.engine.speculative import check_options, speculator_for
    check_options(speculative, draft_model is not None, num_draft_tokens)   # before the slow loads
    path_or_id = model_or_demo(path_or_id)
    path = resolve(path_or_id)
    tokenizer = load_tokenizer(path)
    tp = tp_rank_world()  # inside a torch.distributed group: this rank's share (qwen2.model.tp)
    model = load_model(path, dtype=dtype, device=device, tp=tp)
    over = None   # an adapter that stays a LoRA over quantized weights (added after the speed passes)
    if adapter is not None:
        from qwen2.io.adapter import load_adapter, with_adapter
        from qwen2.model.lora import merge_lora
        from qwen2.quant.blocks import BlockLinear
        from qwen2.quant.linear import QuantLinear
        if tp is not None:
            raise Qwen2Error("an adapter does not combine with tensor parallelism")
        if any(isinstance(m, (QuantLinear, BlockLinear)) for m in model.modules()):
            with_adapter(model, adapter)   # a bad adapter fails now, not after the speed passes
            over = adapter
        else:
            merge_lora(load_adapter(model, adapter)).requires_grad_(True)
        # the adapter is part of the model's identity (per-sample caches key on the source)
        w = Path(adapter) / "adapter_model.safetensors"
        path_or_id = f"{path_or_id} + adapter {Path(adapter).resolve()}:{w.stat().st_size}:{int(w.stat().st_mtime)}"
    if tp is not None and mode == "auto" and model.dtype != torch.float32:
        mode = "eager"  # the compiled step does not trace the collectives
    draft = draft_model
    if draft_model is not None and not isinstance(draft_model, LLM):
        if tp is not None:
            raise Qwen2Error("speculative decoding does not combine with tensor parallelism")
        draft = load(draft_model, dtype=dtype, device=device, mode=mode)
    spec = speculator_for(speculative, draft.model if draft is not None else None, num_draft_tokens,
                          target=model, target_tokenizer=tokenizer,
                          draft_tokenizer=draft.tokenizer if draft is not None else None,
                          draft_name=f"draft model {draft.source}" if draft is not None else "the draft model")
    if spec is not None and tp is not None:
        raise Qwen2Error("speculative decoding does not combine with tensor parallelism")
    path_taken = prepare(model, mode)
    if over is not None:
        load_adapter(model, over)   # LoRA over the quantized (or GGUF-block) weights, base frozen
        if model.decode_step is not None:
            model.decode_step, path_taken = None, "eager"   # the compiled step has no adapter in it
    parallelize(model)
    return LLM(model, tokenizer, SamplingParams.from_generation_config(path if path.is_dir() else None),
               source=str(path_or_id), mode=path_taken, speculator=spec)
