"""`qwen2 generate`: complete a prompt (--prompt or stdin), streaming to stdout; --json prints one
object with the text, token ids, finish reason and timings."""
from __future__ import annotations

import argparse
import json
import sys

from qwen2.cli import _common
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error

# Flag -> SamplingParams field; the same names serve `generate`, `chat` and the Python API.
SAMPLING_FLAGS = [
    ("--max-new-tokens", int, "max_new_tokens", "tokens to generate at most"),
    ("--temperature", float, "temperature", "0 = greedy (default: the checkpoint's generation_config)"),
    ("--top-p", float, "top_p", "nucleus sampling mass (1 = off)"),
    ("--top-k", int, "top_k", "sample among the k most likely tokens (0 = off)"),
    ("--min-p", float, "min_p", "drop tokens below min_p x the top probability (0 = off)"),
    ("--repetition-penalty", float, "repetition_penalty", "transformers-style penalty (1 = off)"),
    ("--presence-penalty", float, "presence_penalty", "OpenAI-style presence penalty"),
    ("--frequency-penalty", float, "frequency_penalty", "OpenAI-style frequency penalty"),
    ("--seed", int, "seed", "seed for reproducible sampling"),
]


def add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--eager", action="store_true",
                   help="no speed passes (by default the fastest path for the machine is chosen: packed "
                        "fp32 kernels, or the compiled decode step, whose first run compiles for 30-60 s "
                        "and later runs reuse Inductor's on-disk cache)")
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    for flag, typ, dest, help_ in SAMPLING_FLAGS:
        g.add_argument(flag, type=typ, dest=dest, default=None, help=help_)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable; not part of the output)")
    add_speculative_args(p)


def add_speculative_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("speculative decoding (same output when greedy, same distribution when sampling)")
    g.add_argument("--draft-model", default=None, metavar="D",
                   help="a smaller model of the same vocabulary drafts tokens the model verifies in one pass")
    g.add_argument("--speculative", choices=["ngram"], default=None,
                   help="ngram: draft by prompt lookup (tokens that followed the last n-gram before)")
    g.add_argument("--num-draft-tokens", type=int, default=None, metavar="K",
                   help="draft tokens per step (default 5 with --draft-model, 10 with ngram)")


def sampling_overrides(args) -> dict:
    kw = {dest: getattr(args, dest) for _, _, dest, _ in SAMPLING_FLAGS if getattr(args, dest) is not None}
    if args.stop:
        kw["stop"] = args.stop
    return kw


def load_llm(args):
    from qwen2.api import load
    return load(_common.model_path(args), dtype=args.dtype, device=args.device, mode="eager" if args.eager else "auto",
                adapter=getattr(args, "adapter", None), draft_model=getattr(args, "draft_model", None),
                speculative=getattr(args, "speculative", None), num_draft_tokens=getattr(args, "num_draft_tokens", None))


def register(subparsers):
    p = subparsers.add_parser("generate", help="complete a prompt (streams to stdout)", description=__doc__)
    _common.add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter directory (PEFT format, e.g. from qwen2 finetune), merged at load")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--top-logprobs", type=int, default=None, help="with --json: logprobs of the N best tokens per step")
    add_sampling_args(p)
    p.set_defaults(func=run)


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        raise Qwen2Error("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    text = sys.stdin.read()
    if not text:
        raise Qwen2Error("no prompt: stdin was empty")
    return text


def run(args) -> int:
    prompt = read_prompt(args)
    kw = sampling_overrides(args)
    if args.top_logprobs:
        kw.update(logprobs=True, top_logprobs=args.top_logprobs)
    SamplingParams().replace(**kw)  # bad values fail before the (slow) model load
    llm = load_llm(args)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        msgs = msgs + [{"role": "user", "content": prompt}]
        _common.check_max_new_tokens(llm, kw.get("max_new_tokens"), len(llm.tokenizer.encode_chat(msgs)))
        stream = llm.chat(msgs, stream=True, **kw)
    else:
        _common.check_max_new_tokens(llm, kw.get("max_new_tokens"), len(llm.tokenizer.encode(prompt)))
        stream = llm.stream(prompt, **kw)
    if args.json:
        for _ in stream:
            pass
        print(json.dumps(completion_dict(stream.completion, llm), ensure_ascii=False))
        return 0
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def completion_dict(c, llm) -> dict:
    d = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
         "stop_reason": c.stop_reason, "prompt_token_ids": c.prompt_token_ids, "timings": c.timings}
    if c.logprobs is not None:
        tok = llm.tokenizer
        d["logprobs"] = [{"token": tok.decode([t.token_id]), "token_id": t.token_id, "logprob": t.logprob,
                          "top_logprobs": [{"token": tok.decode([i]), "token_id": i, "logprob": v} for i, v in t.top]}
                         for t in c.logprobs]
    return d
