"""Fine-tuning on real data with the demo model (Qwen2.5-Coder-0.5B-Instruct), against TRL.

  python scripts/prep_chitchat.py --out /tmp/chitchat
  flock /tmp/qwen2-bench.lock python benchmarks/bench_finetune.py speed --data /tmp/chitchat/sft_train.jsonl
  flock /tmp/qwen2-bench.lock python benchmarks/bench_finetune.py quality --data-dir /tmp/chitchat

speed: LoRA SFT tokens/s and peak RSS, ours (`qwen2 finetune`) against TRL's SFTTrainer with PEFT on
transformers' Qwen2: the same weights (an HF float checkpoint written once from the demo GGUF, which
both load), the same examples (one epoch over the first steps x batch records), sequence length,
batch, rank, targets and dtype; each run in its own process (peak RSS = the process's ru_maxrss,
loading included), rounds alternating ours and TRL. Also QLoRA (int4 base) against LoRA on bf16.

quality: held-out perplexity and a few replies before and after a LoRA SFT run on chitchat, then DPO
(LoRA) on pairs from held-out conversations: held-out reward accuracy before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_checkpoint(path: Path) -> Path:
    """The demo GGUF as an HF float32 checkpoint with tokenizer files (written once)."""
    if (path / "tokenizer.json").is_file():
        return path
    from transformers import AutoTokenizer

    import qwen2
    from qwen2.io.demo import demo_model_path
    src = demo_model_path()
    qwen2.save_model(qwen2.load_model(src, dtype="float32"), path)
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(path)
    return path


def subset(src: str, n: int, out: Path) -> Path:
    lines = Path(src).read_text().splitlines()[:n]
    out.write_text("\n".join(lines) + "\n")
    return out


# ---- one measured run per process -------------------------------------------------------------
def child_ours(a) -> dict:
    from qwen2.train import FinetuneConfig, finetune
    a.base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(a.work) / f"ours-{a.method}-{os.getpid()}"
    cfg = FinetuneConfig(model=a.model, data=a.data, output=str(out), method=a.method, epochs=1, lr=2e-4,
                         batch_size=a.batch, max_len=a.max_len, lora_r=a.rank, lora_alpha=2 * a.rank,
                         lora_dropout=0.05, dtype=a.dtype, progress=False, grad_checkpointing=a.grad_ckpt)
    finetune(cfg)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    tokens = sum(r["tokens"] for r in log)
    return {"tokens": tokens, "seconds": log[-1]["elapsed_s"], "steps": len(log), "final_loss": log[-1]["loss"]}


def child_trl(a) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    a.base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.t1 = time.perf_counter()

    dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    ds = load_dataset("json", data_files=a.data, split="train")
    cfg = SFTConfig(output_dir=str(Path(a.work) / f"trl-{os.getpid()}"), per_device_train_batch_size=a.batch,
                    max_length=a.max_len, num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="cosine",
                    logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=a.grad_ckpt,
                    use_cpu=True, dataloader_num_workers=0, seed=0, bf16=False, fp16=False, packing=False)
    peft_cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05, target_modules=TARGETS,
                          task_type="CAUSAL_LM")
    timer = Timer()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg,
                         callbacks=[timer])
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": timer.t1 - timer.t0, "steps": trainer.state.global_step,
            "final_loss": losses[-1] if losses else None}


def run_child(kind: str, a, **over) -> dict:
    args = dict(model=a.model, data=a.data, work=a.work, batch=a.batch, max_len=a.max_len, rank=a.rank,
                dtype=a.dtype, method="lora", grad_ckpt=a.grad_ckpt)
    args.update(over)
    cmd = [sys.executable, __file__, "_child", kind, json.dumps(args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["tokens_per_s"] = res["tokens"] / res["seconds"]
    return res


def speed(a):
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    a.model = str(hf_checkpoint(Path(a.hf_dir)))
    a.data = str(subset(a.data, a.steps * a.batch, work / "speed.jsonl"))
    rows = []
    for rnd in range(0 if a.qlora_only else a.rounds):
        for kind in (("ours", "trl") if rnd % 2 == 0 else ("trl", "ours")):
            res = run_child(kind, a)
            res.update(kind=kind, round=rnd)
            rows.append(res)
            print(json.dumps(res), flush=True)
    if a.qlora or a.qlora_only:
        # QLoRA from a `qwen2 quantize` checkpoint (int4 group 64, int8 head): no float copy at load
        q4 = Path(a.q4_dir) if a.q4_dir else work / "demo_q4"
        if not (q4 / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "qwen2", "quantize", a.model, str(q4), "--bits", "4",
                            "--group-size", "64"], check=True)
        for rnd in range(a.rounds):
            for method, model in (("qlora", str(q4)), ("lora", a.lora_model or a.model)):
                res = run_child("ours", a, method=method, dtype="bfloat16", model=model)
                res.update(kind=f"ours-{method}-bf16", round=rnd)
                rows.append(res)
                print(json.dumps(res), flush=True)
    print("\nkind               tokens/s   peak RSS MiB  (after imports)   tokens  steps  s")
    for r in rows:
        print(f"{r['kind']:<18} {r['tokens_per_s']:8.1f}   {r['peak_rss_mib']:12.0f}  ({r['rss_after_imports_mib']:14.0f})"
              f"   {r['tokens']:6d}  {r['steps']:5d}  {r['seconds']:.0f}")
    by = lambda k, f: [r[f] for r in rows if r["kind"] == k]
    ours_t, trl_t = by("ours", "tokens_per_s"), by("trl", "tokens_per_s")
    ours_m, trl_m = by("ours", "peak_rss_mib"), by("trl", "peak_rss_mib")
    print(f"\nspeed ratio per round (ours/TRL): {[round(x / y, 2) for x, y in zip(ours_t, trl_t)]}")
    print(f"peak RSS ratio per round (ours/TRL): {[round(x / y, 2) for x, y in zip(ours_m, trl_m)]}")
    if a.qlora or a.qlora_only:
        q, l = by("ours-qlora-bf16", "peak_rss_mib"), by("ours-lora-bf16", "peak_rss_mib")
        print(f"QLoRA / LoRA-bf16 peak RSS per round: {[round(x / y, 2) for x, y in zip(q, l)]}")


# ---- quality --------------------------------------------------------------------------------
def quality(a):
    import torch

    import qwen2
    from qwen2.model.lora import adapter_disabled
    from qwen2.train import FinetuneConfig, finetune
    from qwen2.train import data as D
    from qwen2.train.loss import sequence_logprobs, token_logprobs
    d = Path(a.data_dir)
    work = Path(a.work)
    model_path = str(hf_checkpoint(Path(a.hf_dir)))
    tok = qwen2.load_tokenizer(model_path)
    sft_dir, dpo_dir = work / "sft", work / "dpo"

    def perplexity(model, path, n):
        rows = D.load_sft(path, tok, a.max_len).examples[:n]
        s, k = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(rows), 8):
                ids, mask, labels = D.collate(rows[i:i + 8], tok.pad_token_id)
                lp, _ = token_logprobs(model, ids, mask, labels)
                s, k = s - lp.sum().item(), k + lp.numel()
        return float(torch.tensor(s / k).exp())

    def replies(llm, convs):
        return [llm.chat(c, max_new_tokens=40, temperature=0).text for c in convs]

    eval_recs = [json.loads(x) for x in (d / "sft_eval.jsonl").read_text().splitlines()]
    prompts = [r["messages"][:-1] for r in eval_recs[:a.replies]]

    base = qwen2.load(model_path, dtype=a.dtype, mode="eager")
    ppl_before = perplexity(base.model, d / "sft_eval.jsonl", a.eval_n)
    replies_before = replies(base, prompts)
    print(f"held-out perplexity before: {ppl_before:.3f}", flush=True)
    del base

    t = time.perf_counter()
    subset(str(d / "sft_train.jsonl"), a.sft_steps * a.batch, work / "sft_train.jsonl")
    finetune(FinetuneConfig(model=model_path, data=str(work / "sft_train.jsonl"), output=str(sft_dir), method="lora",
                            epochs=1, lr=a.lr, warmup_steps=10, batch_size=a.batch, max_len=a.max_len, lora_r=a.rank,
                            lora_alpha=2 * a.rank, lora_dropout=0.05, dtype=a.dtype, progress=True))
    sft_s = time.perf_counter() - t
    tuned = qwen2.load(model_path, dtype=a.dtype, adapter=sft_dir, mode="eager")
    ppl_after = perplexity(tuned.model, d / "sft_eval.jsonl", a.eval_n)
    replies_after = replies(tuned, prompts)
    print(f"held-out perplexity after: {ppl_after:.3f}", flush=True)
    del tuned

    # DPO (LoRA) on the base model: pairs from conversations neither run saw before
    def reward_stats(model, pairs):
        """Implicit DPO reward accuracy (policy vs adapter-off reference), and the plain
        log-likelihood preference (chosen more likely than rejected) of the policy."""
        acc = like = 0
        with torch.no_grad():
            for i in range(0, len(pairs), 8):
                chunk = pairs[i:i + 8]
                ids, mask, labels = D.collate(D.dpo_rows(chunk), tok.pad_token_id)
                pol = sequence_logprobs(model, ids, mask, labels)
                with adapter_disabled(model):
                    ref = sequence_logprobs(model, ids, mask, labels)
                n = len(chunk)
                acc += ((pol[:n] - ref[:n]) > (pol[n:] - ref[n:])).sum().item()
                like += (pol[:n] > pol[n:]).sum().item()
        return acc / len(pairs), like / len(pairs)

    eval_pairs = D.load_dpo(d / "dpo_eval.jsonl", tok, a.max_len).pairs[:a.dpo_eval_n]
    m = qwen2.load_model(model_path, dtype=a.dtype)
    _, like_before = reward_stats(m, eval_pairs)
    del m
    t = time.perf_counter()
    subset(str(d / "dpo_train.jsonl"), a.dpo_steps * a.batch, work / "dpo_train.jsonl")
    res = finetune(FinetuneConfig(model=model_path, data=str(work / "dpo_train.jsonl"), output=str(dpo_dir), method="dpo", beta=a.beta,
                                  epochs=1, lr=a.dpo_lr, warmup_steps=5, batch_size=a.batch, max_len=a.max_len,
                                  lora_r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, dtype=a.dtype, progress=True))
    dpo_s = time.perf_counter() - t
    from qwen2.io.adapter import load_adapter
    m = load_adapter(qwen2.load_model(model_path, dtype=a.dtype), dpo_dir)
    acc_after, like_after = reward_stats(m, eval_pairs)
    report = {
        "sft": {"train_examples": a.sft_steps * a.batch, "steps": a.sft_steps, "seconds": round(sft_s),
                "eval_conversations": a.eval_n, "perplexity_before": ppl_before, "perplexity_after": ppl_after},
        "dpo": {"train_pairs": a.dpo_steps * a.batch, "eval_pairs": len(eval_pairs), "seconds": round(dpo_s),
                "beta": a.beta, "reward_accuracy_before": 0.0, "reward_accuracy_after": acc_after,
                "last_train_step": res,
                "likelihood_preference_before": like_before, "likelihood_preference_after": like_after},
        "replies": [{"conversation": p[-2:], "before": b, "after": x}
                    for p, b, x in zip(prompts, replies_before, replies_after)],
    }
    (work / "quality.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(json.dumps(report, indent=2, ensure_ascii=False))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        a = argparse.Namespace(**json.loads(sys.argv[3]))
        res = child_ours(a) if sys.argv[2] == "ours" else child_trl(a)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["rss_after_imports_mib"] = a.base_rss
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("speed", "quality"):
        p = sub.add_parser(name)
        p.add_argument("--work", default="/tmp/bench_finetune")
        p.add_argument("--hf-dir", default="/tmp/bench_finetune/demo_hf")
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--max-len", type=int, default=192)
        p.add_argument("--rank", type=int, default=16)
        p.add_argument("--dtype", default="bfloat16")
    s = sub.choices["speed"]
    s.add_argument("--data", default="/tmp/chitchat/sft_train.jsonl")
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--qlora", action="store_true", help="also QLoRA (int4 base) against LoRA on bf16")
    s.add_argument("--qlora-only", action="store_true", help="only QLoRA against LoRA on bf16 (no TRL rounds)")
    s.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in every leg (ours and TRL)")
    s.add_argument("--q4-dir", help="the int4 checkpoint for QLoRA (default: WORK/demo_q4, made from --hf-dir)")
    s.add_argument("--lora-model", help="the checkpoint of the LoRA-on-bf16 leg against QLoRA (default: --hf-dir, "
                                         "float32; a bf16 checkpoint loads in place, without a float32 transient)")
    q = sub.choices["quality"]
    q.add_argument("--data-dir", default="/tmp/chitchat")
    q.add_argument("--sft-steps", type=int, default=150)
    q.add_argument("--dpo-steps", type=int, default=60)
    q.add_argument("--eval-n", type=int, default=100)
    q.add_argument("--replies", type=int, default=3)
    q.add_argument("--dpo-eval-n", type=int, default=100)
    q.add_argument("--lr", type=float, default=3e-4)
    q.add_argument("--dpo-lr", type=float, default=1e-4)
    q.add_argument("--beta", type=float, default=0.1)
    a = ap.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    speed(a) if a.cmd == "speed" else quality(a)


if __name__ == "__main__":
    main()
