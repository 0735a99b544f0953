"""The fine-tuning recipe: SFT with LoRA, QLoRA or full weights, and DPO. Reads top to bottom:
set up (processes, seed), model (+ quantized base, + adapters, + activation checkpointing, + FSDP2),
data, optimizer and schedule, resume, the loop (progress bar, JSONL log, evaluation, checkpoints,
Ctrl-C), and the outputs (a PEFT adapter or an HF checkpoint, optionally merged).

Under `torchrun --nproc-per-node N` it trains data-parallel with torch's FSDP2 (`fully_shard`,
gloo on CPU, NCCL on GPUs): each process takes its slice of the global batch, and the loss is
normalized by the global number of scored tokens (pairs, for DPO), so N processes compute the
same update as one process with the same global batch.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from qwen2.errors import Qwen2Error
from qwen2.model.lora import TARGETS, adapter_disabled, add_lora, merge_lora
from qwen2.train import data as D
from qwen2.train.loss import dpo_loss, sequence_logprobs, token_logprobs

METHODS = ("lora", "qlora", "full", "dpo")


@dataclass
class FinetuneConfig:
    model: str
    data: str
    output: str
    eval_data: str | None = None
    method: str = "lora"            # lora | qlora | full | dpo
    dpo_weights: str = "lora"       # what DPO trains: lora | full
    beta: float = 0.1               # DPO's inverse temperature
    rpo_alpha: float = 0.0          # DPO + rpo_alpha * the chosen reply's mean token NLL (TRL's rpo_alpha)
    epochs: float = 1.0
    max_steps: int | None = None    # overrides epochs
    lr: float = 2e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0       # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4             # per process
    grad_accum: int = 1
    max_len: int = 1024
    packing: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(TARGETS))
    qlora_bits: int = 4
    qlora_group_size: int = 64
    seed: int = 0
    grad_checkpointing: bool = False
    dtype: str = "float32"          # float32 | bfloat16 (base weights; adapters stay float32)
    eval_every: int = 0             # 0: at the end only
    save_every: int = 0             # 0: at the end (and on Ctrl-C) only
    resume: bool = False
    merge: bool = False
    progress: bool = True


def finetune(cfg: FinetuneConfig) -> dict:
    """Train; returns the last log record (with the final evaluation when there is eval data)."""
    check(cfg)
    # ---- processes ----------------------------------------------------------------------------
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main = rank == 0
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.output)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    # ---- model --------------------------------------------------------------------------------
    from qwen2.io.hub import resolve
    from qwen2.io.load import load_model, load_tokenizer
    path = resolve(cfg.model)
    tok = load_tokenizer(path)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[cfg.dtype]
    model = load_model(path, dtype=dtype)
    if cfg.method == "qlora" and not model.quant:
        from qwen2.quant.linear import quantize_model
        # the lm_head (tied to the embedding in small Qwen2s) stays float: one table, not two
        quantize_model(model, cfg.qlora_bits, cfg.qlora_group_size, lm_head=False)
    elif model.quant and cfg.method != "qlora":
        raise Qwen2Error(f"{path.name} is quantized: train an adapter on it with --method qlora")
    lora = cfg.method in ("lora", "qlora") or (cfg.method == "dpo" and cfg.dpo_weights == "lora")
    ref_model = None
    if lora:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    elif cfg.method == "dpo":  # full-weight DPO needs its own frozen reference
        ref_model = load_model(path, dtype=dtype).eval().requires_grad_(False)
    model.train()
    if cfg.grad_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = checkpoint_wrapper(layer)
    if distributed:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)

    # ---- data ---------------------------------------------------------------------------------
    dpo = cfg.method == "dpo"
    train = D.load_dpo(cfg.data, tok, cfg.max_len) if dpo else D.load_sft(cfg.data, tok, cfg.max_len, cfg.packing)
    evals = None
    if cfg.eval_data:
        evals = D.load_dpo(cfg.eval_data, tok, cfg.max_len) if dpo else D.load_sft(cfg.eval_data, tok, cfg.max_len)
    items = train.pairs if dpo else train.examples
    global_batch = cfg.batch_size * world
    if len(items) < global_batch:
        raise Qwen2Error(f"{cfg.data}: {len(items)} examples, fewer than one global batch ({global_batch})")
    order = D.Order(len(items), global_batch, cfg.seed)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.batches_per_epoch() / cfg.grad_accum))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if main:
        what = "pairs" if dpo else ("packed rows" if cfg.packing else "examples")
        print(f"data: {train.records} records -> {len(items)} {what}; {train.truncated} truncated to "
              f"{cfg.max_len} tokens" + (f"; eval: {evals.records} records ({evals.truncated} truncated)" if evals else ""))
        print(f"model: {path.name}, {cfg.method}{'/' + cfg.dpo_weights if dpo else ''}, {n_train:,} trainable "
              f"parameters, {steps} steps of {global_batch * cfg.grad_accum} {'pairs' if dpo else 'examples'}"
              f" on {world} process{'es' if world > 1 else ''}")

    # ---- optimizer and schedule ---------------------------------------------------------------
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        t = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    for g in opt.param_groups:  # (LambdaLR's key, set first: a saved optimizer state carries it)
        g["initial_lr"] = cfg.lr

    # ---- resume -------------------------------------------------------------------------------
    start = 0
    ckpt_dir = out / "checkpoint"
    if cfg.resume:
        if not (ckpt_dir / "state.json").is_file():
            raise Qwen2Error(f"--resume: no checkpoint in {ckpt_dir}")
        start = load_checkpoint(ckpt_dir, model, opt, cfg)
        if main:
            print(f"resumed from {ckpt_dir} at step {start}")
    # The schedule is this run's, placed at `start`: a resumed run given more steps or another --lr
    # goes on along its own cosine, not from the saved run's last learning rate (0 at its end).
    for g in opt.param_groups:
        g["initial_lr"] = cfg.lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor, last_epoch=start - 1)

    # ---- one step -----------------------------------------------------------------------------
    def micro_batches(step: int):
        for a in range(cfg.grad_accum):
            idx = order.batch(step * cfg.grad_accum + a)
            mine = idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            yield [items[i] for i in mine], [items[i] for i in idx]

    def all_sum(x: float) -> float:
        if not distributed:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()

    def dpo_stats(pairs, grad: bool):
        """Summed DPO losses, rewards, accuracy over the pairs, and the summed per-pair mean token NLL
        of the chosen replies (the RPO term); policy with grad if asked."""
        ids, mask, labels = D.collate(D.dpo_rows(pairs), pad)
        n = len(pairs)
        with torch.set_grad_enabled(grad):
            pol = sequence_logprobs(model, ids, mask, labels)
            chosen_tokens = (labels[:n, 1:] != D.IGNORE_INDEX).sum(1).clamp(min=1)
            nll = (-pol[:n] / chosen_tokens).sum()
        with torch.no_grad():
            if ref_model is not None:
                ref = sequence_logprobs(ref_model, ids, mask, labels)
            else:
                with adapter_disabled(model):
                    ref = sequence_logprobs(model, ids, mask, labels)
        losses, rc, rr = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], cfg.beta)
        return losses.sum(), {"rewards_chosen": rc.sum().item(), "rewards_rejected": rr.sum().item(),
                              "reward_accuracy": (rc > rr).float().sum().item(),
                              "reward_margin": (rc - rr).sum().item(), "nll_chosen": nll.item()}, int(mask.sum()), nll

    def train_step(step: int) -> dict:
        opt.zero_grad(set_to_none=True)
        batches = list(micro_batches(step))
        # the normalizer: scored tokens (pairs for DPO) of the whole global step
        if dpo:
            total = float(sum(len(b) for _, b in batches))
        else:
            total = float(sum(sum(1 for t in lab[1:] if t != D.IGNORE_INDEX) for _, b in batches for _, lab in b))
        loss_sum, tokens, extra = 0.0, 0, {}
        for mine, _ in batches:
            if dpo:
                s, st, ntok, nll = dpo_stats(mine, grad=True)
                if cfg.rpo_alpha:
                    s = s + cfg.rpo_alpha * nll
                for k, v in st.items():
                    extra[k] = extra.get(k, 0.0) + v
            else:
                ids, mask, labels = D.collate(mine, pad)
                lp, _ = token_logprobs(model, ids, mask, labels)
                s, ntok = -lp.sum(), int(mask.sum())
            # FSDP averages gradients over processes: scale back up to a sum over the global batch
            (s * world / max(total, 1.0)).backward()
            loss_sum += s.item()
            tokens += ntok
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        rec = {"step": step + 1, "loss": all_sum(loss_sum) / max(total, 1.0), "lr": lr,
               "grad_norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
               "tokens": int(all_sum(tokens))}
        for k, v in extra.items():
            rec[k] = all_sum(v) / total
        return rec

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        rows = evals.pairs if dpo else evals.examples
        mine = rows[rank::world]
        sums: dict[str, float] = {}
        for i in range(0, len(mine), cfg.batch_size):
            chunk = mine[i:i + cfg.batch_size]
            if dpo:
                s, st, _, _ = dpo_stats(chunk, grad=False)
                st["loss"] = s.item()  # the DPO loss alone (no RPO term): comparable across runs
            else:
                ids, mask, labels = D.collate(chunk, pad)
                lp, _ = token_logprobs(model, ids, mask, labels)
                st = {"loss": -lp.sum().item(), "n": lp.numel()}
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + v
        model.train()
        n = all_sum(sums.get("n", 0.0)) if not dpo else float(len(rows))
        res = {f"eval_{k}": all_sum(v) / max(n, 1.0) for k, v in sums.items() if k != "n"}
        if not dpo:
            res["eval_perplexity"] = math.exp(min(res["eval_loss"], 50.0))
        return res

    # ---- the loop -----------------------------------------------------------------------------
    log = (out / "log.jsonl").open("a") if main else None

    def write(rec: dict):
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    bar = tqdm(total=steps, initial=start, disable=not (main and cfg.progress), unit="step", dynamic_ncols=True)
    t0, tok_seen, rec = time.perf_counter(), 0, {}
    with _StopOnCtrlC() as ctrl_c:
        for step in range(start, steps):
            rec = train_step(step)
            tok_seen += rec["tokens"]
            rec["tokens_per_s"] = tok_seen / (time.perf_counter() - t0)
            rec["elapsed_s"] = time.perf_counter() - t0
            write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            done = step + 1
            if ctrl_c.requested(distributed):
                bar.close()
                save_checkpoint(ckpt_dir, model, opt, done, cfg, main)
                if main:
                    print(f"interrupted: checkpoint at step {done} saved in {ckpt_dir}; continue with --resume")
                raise KeyboardInterrupt
            if evals and cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
                ev = {"step": done, **evaluate()}
                write(ev)
                bar.write(" ".join(f"{k}={v:.4g}" for k, v in ev.items()))
            if cfg.save_every and done % cfg.save_every == 0 and done < steps:
                save_checkpoint(ckpt_dir, model, opt, done, cfg, main)
    bar.close()
    if evals:
        ev = {"step": steps, **evaluate()}
        write(ev)
        rec = {**rec, **ev}
        if main:
            print(" ".join(f"{k}={v:.4g}" for k, v in ev.items()))

    # ---- outputs ------------------------------------------------------------------------------
    save_checkpoint(ckpt_dir, model, opt, steps, cfg, main)
    save_outputs(model, out, path, tok, cfg, lora, main)
    if log:
        log.close()
    if distributed:
        dist.barrier()
    return rec


class _StopOnCtrlC:
    """The first Ctrl-C lets the running step finish (an optimizer step is never half applied),
    then the loop saves a checkpoint and stops; a second one interrupts at once."""

    def __enter__(self):
        import signal
        self._flag = False
        self._old = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            self._flag = True
            signal.signal(signal.SIGINT, self._old)

        try:
            signal.signal(signal.SIGINT, handler)
            self._installed = True
        except ValueError:  # not the main thread: Ctrl-C stays a plain KeyboardInterrupt
            self._installed = False
        return self

    def requested(self, distributed: bool) -> bool:
        if not distributed:
            return self._flag
        t = torch.tensor([float(self._flag)])
        dist.all_reduce(t)  # every process stops at the same step
        return bool(t.item())

    def __exit__(self, *exc):
        import signal
        if self._installed:
            signal.signal(signal.SIGINT, self._old)
        return False


def check(cfg: FinetuneConfig):
    if cfg.method not in METHODS:
        raise Qwen2Error(f"--method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    if cfg.rpo_alpha < 0:
        raise Qwen2Error("--rpo-alpha must be >= 0")
    if cfg.dpo_weights not in ("lora", "full"):
        raise Qwen2Error(f"--dpo-weights must be lora or full, not {cfg.dpo_weights!r}")
    if cfg.dtype not in ("float32", "bfloat16", "bf16"):
        raise Qwen2Error(f"--dtype must be float32 or bfloat16 for training, not {cfg.dtype!r}")
    for name in ("batch_size", "grad_accum", "max_len", "lora_r"):
        if getattr(cfg, name) < 1:
            raise Qwen2Error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise Qwen2Error("--max-steps must be >= 1")
    if cfg.lr <= 0 or cfg.epochs <= 0:
        raise Qwen2Error("--lr and --epochs must be > 0")
    bad = sorted(set(cfg.lora_targets) - set(TARGETS))
    if bad:
        raise Qwen2Error(f"unknown LoRA target(s) {bad}; choose from {', '.join(TARGETS)}")
    if cfg.merge and cfg.method == "qlora":
        raise Qwen2Error("--merge needs float base weights; merge a QLoRA adapter by loading it on the float model")
    if not Path(cfg.data).is_file():
        raise Qwen2Error(f"{cfg.data}: no such data file")


# ---- checkpoints: the trainable state, the optimizer, the step (the schedule is the run's) ------
def _trainable_names(model) -> set[str]:
    from torch.distributed.checkpoint.state_dict import _get_fqns
    return {fqn for n, p in model.named_parameters() if p.requires_grad for fqn in _get_fqns(model, n)}


def save_checkpoint(ckpt_dir: Path, model, opt, step: int, cfg: FinetuneConfig, main: bool):
    """Written to a temporary directory and renamed, so an interruption never leaves half a checkpoint."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    keep = _trainable_names(model)
    state = {k: v.contiguous() for k, v in get_model_state_dict(model, options=opts).items() if k in keep}
    optim = get_optimizer_state_dict(model, opt, options=opts)
    if not main:
        return
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optim, "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}, indent=2))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tmp.rename(ckpt_dir)


def load_checkpoint(ckpt_dir: Path, model, opt, cfg: FinetuneConfig) -> int:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    meta = json.loads((ckpt_dir / "state.json").read_text())
    saved = meta["config"]
    for k in ("method", "dpo_weights", "lora_r", "lora_targets", "batch_size", "grad_accum", "seed", "data"):
        if saved.get(k) != getattr(cfg, k):
            raise Qwen2Error(f"--resume: the checkpoint was trained with {k}={saved.get(k)!r}, not {getattr(cfg, k)!r}")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    state = load_file(str(ckpt_dir / "trainable.safetensors"))
    missing = _trainable_names(model) - set(state)
    if missing:
        raise Qwen2Error(f"--resume: {ckpt_dir} lacks {sorted(missing)[0]}")
    set_model_state_dict(model, state, options=opts)
    extra = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(model, opt, extra["optimizer"], options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(extra["rng"])
    return int(meta["step"])


def save_outputs(model, out: Path, path: Path, tok, cfg: FinetuneConfig, lora: bool, main: bool):
    """LoRA: the adapter in PEFT's format in `out` (and with --merge an HF checkpoint in out/merged);
    full weights: an HF checkpoint in `out`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from qwen2.io.adapter import save_adapter
    from qwen2.io.save import save_model
    distributed = dist.is_initialized()
    if not distributed:
        _unwrap_checkpointing(model)
    if distributed:  # gather the whole weights onto one plain model on the main process
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not main:
            return
        from qwen2.io.load import load_model
        plain = load_model(path, dtype=model.dtype if hasattr(model, "dtype") else torch.float32)
        if lora:
            add_lora(plain, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.lora_targets)
        plain.load_state_dict(state, strict=False)
        model = plain
    if lora:
        save_adapter(model, out, base_model=str(cfg.model))
        if cfg.merge:
            merged = merge_lora(model)
            save_model(merged, out / "merged")
            _copy_tokenizer(path, out / "merged")
        return
    save_model(model, out)
    _copy_tokenizer(path, out)


def _unwrap_checkpointing(model):
    """Put each layer back in place of its activation-checkpointing wrapper (names as saved)."""
    for i, layer in enumerate(model.model.layers):
        inner = getattr(layer, "_checkpoint_wrapped_module", None)
        if inner is not None:
            model.model.layers[i] = inner


def _copy_tokenizer(src: Path, dst: Path):
    """Tokenizer and generation files of an HF checkpoint directory (a GGUF keeps its tokenizer inside
    the file: pass the .gguf as --model's tokenizer source is then not possible; say so)."""
    if not src.is_dir():
        print(f"note: {src.name} is a single file; copy tokenizer files into {dst} to use it on its own")
        return
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json",
                 "special_tokens_map.json", "added_tokens.json", "qwen.tiktoken"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
