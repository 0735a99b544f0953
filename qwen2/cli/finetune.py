"""`qwen2 finetune`: SFT with LoRA, QLoRA or full weights, or DPO, on JSONL data in TRL's formats
({"messages"}, {"prompt", "completion"}, {"text"}; DPO: {"prompt", "chosen", "rejected"}).
Writes a PEFT adapter (LoRA) or an HF checkpoint (full) to --output, a JSONL log of every step and
evaluation (log.jsonl), and a resumable checkpoint (--resume; Ctrl-C saves one). Data-parallel
under `torchrun --nproc-per-node N qwen2 finetune ...` (FSDP2)."""
from __future__ import annotations

from qwen2.cli import _common
from qwen2.model.lora import TARGETS


def register(subparsers):
    p = subparsers.add_parser("finetune", help="fine-tune with LoRA, QLoRA, full weights or DPO", description=__doc__)
    p.add_argument("--model", "-m", default=None, help="checkpoint dir, .gguf file or hub id (default: the demo model)")
    p.add_argument("--data", required=True, help="training data, JSONL")
    p.add_argument("--eval-data", default=None, help="held-out data, JSONL (loss and perplexity; DPO: reward accuracy)")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--method", default="lora", choices=("lora", "qlora", "full", "dpo"),
                   help="qlora: LoRA over int4/int8 weights: a float --model is quantized in memory, a checkpoint "
                        "from `qwen2 quantize` is taken as it is (the lowest peak memory: no float copy at load)")
    p.add_argument("--dpo-weights", default="lora", choices=("lora", "full"), help="what DPO trains")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    p.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="DPO: add ALPHA x the chosen reply's mean token NLL to each pair's loss (RPO, TRL's "
                        "rpo_alpha): keeps the chosen replies likely, against DPO's length bias")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-4 LoRA, 2e-5 full, 5e-6 "
                   "full DPO)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--batch-size", type=int, default=4, help="examples (DPO: pairs) per step and process")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--max-len", type=int, default=1024, help="tokens per example (longer ones are cut, and counted)")
    g.add_argument("--packing", action="store_true", help="concatenate examples into rows of --max-len")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default=",".join(TARGETS), help="comma-separated projections")
    g.add_argument("--qlora-bits", type=int, default=4, choices=(4, 8))
    g.add_argument("--qlora-group-size", type=int, default=64)
    g = p.add_argument_group("memory and output")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "bf16"),
                   help="base weights (LoRA adapters are float32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end)")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    g.add_argument("--resume", action="store_true", help="continue from --output's checkpoint")
    g.add_argument("--merge", action="store_true", help="LoRA: also write the merged HF checkpoint to OUTPUT/merged")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from qwen2.train import FinetuneConfig, finetune
    full = args.method == "full" or (args.method == "dpo" and args.dpo_weights == "full")
    lr = args.lr or (2e-4 if not full else 5e-6 if args.method == "dpo" else 2e-5)
    cfg = FinetuneConfig(
        model=_common.model_path(args), data=args.data, output=args.output, eval_data=args.eval_data,
        method=args.method, dpo_weights=args.dpo_weights, beta=args.beta, rpo_alpha=args.rpo_alpha, epochs=args.epochs,
        max_steps=args.max_steps, lr=lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len, packing=args.packing,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
        qlora_bits=args.qlora_bits, qlora_group_size=args.qlora_group_size, seed=args.seed,
        grad_checkpointing=args.gradient_checkpointing, dtype=args.dtype, eval_every=args.eval_every,
        save_every=args.save_every, resume=args.resume, merge=args.merge, progress=not args.no_progress)
    finetune(cfg)
    return 0
