"""`qwen2 chat`: an interactive multi-turn chat with streaming replies.

Commands: /reset (forget the conversation), /system TEXT (new system prompt, starts over),
/exit. Ctrl-C stops the reply being written and keeps the session; Ctrl-D (EOF) exits. After each
reply a line on stderr gives its tokens, decode speed (tokens/s) and the wait for its first token."""
from __future__ import annotations

import argparse
import sys
import time

from qwen2.cli import _common
from qwen2.cli.generate import add_sampling_args, load_llm, sampling_overrides
from qwen2.engine.sampling import SamplingParams

HELP = "/reset  forget the conversation · /system TEXT  set the system prompt · /exit  quit · Ctrl-C stops a reply"


def register(subparsers):
    p = subparsers.add_parser("chat", help="interactive chat with streaming replies", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter directory (PEFT format, e.g. from qwen2 finetune), merged at load")
    add_sampling_args(p)
    p.set_defaults(func=run, max_new_tokens=1024)


def run(args) -> int:
    sampling = sampling_overrides(args)
    SamplingParams().replace(**sampling)  # bad values fail before the (slow) model load
    t0 = time.monotonic()
    llm = load_llm(args)
    loaded = time.monotonic() - t0
    _common.check_max_new_tokens(llm, sampling.get("max_new_tokens"))
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"qwen2 chat · {args.model or 'demo model'} · loaded in {loaded:.1f} s · {HELP}", file=sys.stderr)
    system, turns = args.system, []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit to quit)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                return 0
            if cmd == "/reset":
                turns = []
                print("(conversation cleared)")
            elif cmd == "/system":
                system, turns = rest.strip() or None, []
                print("(system prompt set; conversation cleared)" if system else "(default system prompt)")
            elif cmd == "/help":
                print(HELP)
            else:
                print(f"(unknown command {cmd}; {HELP})")
            continue
        turns.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        reply = _reply(llm, messages, sampling)
        turns.append({"role": "assistant", "content": reply})


def _reply(llm, messages, sampling) -> str:
    """Stream one reply to stdout; Ctrl-C ends it early and keeps what was written."""
    stream = llm.chat(messages, stream=True, **sampling)
    reply = ""
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply += piece
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stream.completion is not None:
        print(stats_line(stream.completion.timings), file=sys.stderr, flush=True)
    return reply


def stats_line(t: dict) -> str:
    """[42 tokens · 31.5 tok/s · first token 0.21 s] from a completion's timings."""
    speed = f"{t['decode_tokens_per_s']:.1f} tok/s" if t.get("decode_tokens_per_s") else "- tok/s"
    return f"[{t['completion_tokens']} tokens · {speed} · first token {t['prefill_s']:.2f} s]"
