"""`qwen2 lm-eval ...`: lm-evaluation-harness' own command line with the `qwen2` model registered
(lm-eval 0.4 has no plugin entry point for models), e.g.

    qwen2 lm-eval --model qwen2 --model_args pretrained=PATH --tasks qwen2_mmlu \\
        --include_path "$(qwen2 lm-eval --offline-tasks)" --limit 5
"""
from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser(
        # Every argument is lm-eval's: no option of our own ("\x00" is no prefix anyone types).
        "lm-eval", help="lm-evaluation-harness' CLI with the qwen2 model (--model qwen2)", add_help=False,
        prefix_chars="\x00",
        description="Runs `lm_eval` with the qwen2 model registered; every argument goes to lm-eval. "
                    "--offline-tasks prints the directory of lm-eval task files over the installed data.")
    p.add_argument("args", nargs="*")
    p.set_defaults(func=run)


def run(args) -> int:
    from qwen2.errors import Qwen2Error
    try:
        from qwen2.eval import harness
    except ImportError as e:
        raise Qwen2Error(f'qwen2 lm-eval needs lm-eval: pip install "qwen2[eval]" ({e})') from None
    return harness.main(list(args.args))
