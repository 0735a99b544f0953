"""Tensor parallelism over torch.distributed (NCCL on GPUs, gloo on CPU), as two small passes.

`TPShard(config, rank, world)` decides what each rank holds, before any weight is read: the loaders
build the model from `shard.config` (this rank's heads, KV heads and MLP width; the vocabulary and
every other size stay global) and pass each checkpoint tensor through `shard.slice`, which keeps this
rank's rows or columns of it (or drops it: another rank's expert), so a rank never holds a full copy.

* attention: q/k/v column-parallel by heads (each rank: num_heads / N query heads and their KV heads;
  when N exceeds the KV heads, each KV head is replicated on the N / kv ranks whose queries use it);
  o_proj row-parallel, one all-reduce per layer;
* MLP: gate/up column-parallel, down_proj row-parallel, one all-reduce per layer;
* MoE: experts divided among ranks whole (expert parallelism), the shared expert split as an MLP,
  the router and the shared expert's gate replicated; each rank adds its experts' and its shard of
  the shared expert's output, one all-reduce per layer;
* embedding and lm_head vocab-parallel (each rank a contiguous block of rows: the embedding sums
  the ranks' lookups, the head gathers their logits), or replicated when N does not divide the
  vocabulary.

`parallelize(model, shard)` then adds the collectives to a loaded (and speed-pass prepared) model:
forward hooks on each layer's attention and MLP, wrappers around the embedding and the head. Every
rank computes the same logits, so ranks that run the same requests with the same seeds stay in
lockstep without talking beyond those collectives.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from qwen2.errors import Qwen2Error
from qwen2.model.config import ModelConfig

__all__ = ["TPShard", "check_tp_size", "init_from_env", "parallelize", "problems", "rank_memory", "spawn_local_ranks",
           "tp_rank_world", "valid_tp_sizes"]


def problems(config: ModelConfig, n: int, group_size: int | None = None) -> list[str]:
    """Why `n` ranks cannot split `config` (empty: they can). group_size: quantization group width
    along the input of row-parallel layers (GPTQ), which a rank's share must hold whole groups of."""
    h, kv = config.num_attention_heads, config.num_key_value_heads
    out = []
    if h % n:
        out.append(f"{h} attention heads")
    elif kv % n and n % kv:
        out.append(f"{kv} KV heads")
    widths = [("intermediate size", config.intermediate_size)]
    if config.is_moe:
        widths.append(("shared expert width", config.shared_expert_intermediate_size))
        if config.num_experts % n:
            out.append(f"{config.num_experts} experts")
    for what, w in widths:
        if w % n:
            out.append(f"{what} {w}")
        elif group_size and group_size > 0 and (w // n) % group_size:
            out.append(f"{what} {w} in groups of {group_size}")
    return out


def valid_tp_sizes(config: ModelConfig, group_size: int | None = None, limit: int = 64) -> list[int]:
    return [n for n in range(1, limit + 1) if not problems(config, n, group_size)]


def check_tp_size(config: ModelConfig, n: int, group_size: int | None = None):
    if n < 1:
        raise Qwen2Error(f"tensor-parallel size must be >= 1, not {n}")
    bad = problems(config, n, group_size)
    if bad:
        sizes = ", ".join(map(str, valid_tp_sizes(config, group_size, limit=max(n, 16))))
        raise Qwen2Error(f"tensor-parallel size {n} does not divide this model ({'; '.join(bad)}); "
                         f"valid sizes: {sizes}")


@dataclasses.dataclass
class TPShard:
    """What rank `rank` of `world` holds of a model with `global_config`."""
    global_config: ModelConfig
    rank: int
    world: int
    group_size: int | None = None  # GPTQ group width (row-parallel inputs split at group bounds)

    def __post_init__(self):
        c = self.global_config
        check_tp_size(c, self.world, self.group_size)
        if not 0 <= self.rank < self.world:
            raise Qwen2Error(f"rank {self.rank} outside a tensor-parallel group of {self.world}")
        n, r = self.world, self.rank
        self.heads = c.num_attention_heads // n
        self.kv_heads = max(1, c.num_key_value_heads // n)
        # This rank's first KV head: its query heads' own when the KV heads divide among the ranks,
        # else the one KV head its query heads share (replicated on n // kv ranks).
        self.kv_first = r * self.kv_heads if c.num_key_value_heads >= n else r // (n // c.num_key_value_heads)
        self.vocab_parallel = c.vocab_size % n == 0
        self.vocab = c.vocab_size // n if self.vocab_parallel else c.vocab_size
        self.vocab_start = r * self.vocab if self.vocab_parallel else 0
        if c.is_moe:
            per = c.num_experts // n
            self.experts = range(r * per, (r + 1) * per)
        local = dict(num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=c.head_dim,
                     intermediate_size=c.intermediate_size // n)
        if c.is_moe:
            local["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size // n
        self.config = dataclasses.replace(c, **local)

    def build(self) -> nn.Module:
        """This rank's model (on the current default device, e.g. meta, before loading)."""
        from qwen2.model.decoder import Qwen2
        model = Qwen2(self.config)
        c, h = self.global_config, self.global_config.hidden_size
        if self.vocab_parallel:
            model.model.embed_tokens = nn.Embedding(self.vocab, h)
            model.lm_head = nn.Linear(h, self.vocab, bias=False)
            if c.tie_word_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
        for layer in model.model.layers:
            moe = getattr(layer.mlp, "experts", None)
            if moe is not None:
                for e in range(len(moe)):
                    if e not in self.experts:
                        moe[e] = nn.Identity()  # another rank's expert: nothing held here
        return model

    def slice(self, pname: str, part: int | None, t: torch.Tensor) -> torch.Tensor | None:
        """This rank's share of checkpoint tensor `t` for model parameter `pname` (`part`: which
        part of a fused projection), or None when another rank holds all of it."""
        d = self.global_config.head_dim
        mod, _, leaf = pname.rpartition(".")
        last = mod.rpartition(".")[2]
        if ".experts." in pname:
            return t if int(pname.split(".experts.")[1].split(".")[0]) in self.experts else None
        if last in ("embed_tokens", "lm_head"):
            return t[self.vocab_start:self.vocab_start + self.vocab] if self.vocab_parallel else t
        if last == "qkv_proj":
            if part == 0:
                return t[self.rank * self.heads * d:(self.rank + 1) * self.heads * d]
            return t[self.kv_first * d:(self.kv_first + self.kv_heads) * d]
        if last == "o_proj" and leaf == "weight":
            return t[:, self.rank * self.heads * d:(self.rank + 1) * self.heads * d]
        if last == "gate_up_proj":
            w = t.shape[0] // self.world
            return t[self.rank * w:(self.rank + 1) * w]
        if last == "down_proj" and leaf == "weight":
            w = t.shape[1] // self.world
            return t[:, self.rank * w:(self.rank + 1) * w]
        return t  # norms, the router, the shared expert's gate, o_proj's bias: replicated

    def __repr__(self):
        return f"TPShard(rank {self.rank} of {self.world})"


def _all_reduce(_module, _inputs, out):
    # In place: every rank gets the sum of the ranks' partial outputs (gloo and NCCL alike).
    dist.all_reduce(out)
    return out


class VocabParallelEmbedding(nn.Module):
    """Each rank looks up the ids in its block of rows (zeros for the others); the sum over ranks is
    the full lookup."""

    def __init__(self, inner: nn.Module, start: int, rows: int):
        super().__init__()
        self.inner, self.start, self.rows = inner, start, rows

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = self.inner(local.masked_fill(outside, 0))
        x = x.masked_fill(outside[..., None], 0)
        dist.all_reduce(x)
        return x


class VocabParallelHead(nn.Module):
    """Each rank computes the logits of its vocabulary block; gathered, every rank has them all."""

    def __init__(self, inner: nn.Module, world: int):
        super().__init__()
        self.inner, self.world = inner, world

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, x):
        y = self.inner(x).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y)
        return torch.cat(parts, dim=-1)


def parallelize(model: nn.Module) -> nn.Module:
    """Add the collectives to `model`, built by `model.tp.build()` and loaded through
    `model.tp.slice` (qwen2.io.build.build_model(shard=)), after any speed pass that replaces
    modules: the hooks sit on the modules present now."""
    shard = model.tp
    if shard is None or shard.world == 1 or getattr(model, "_tp_parallel", False):
        return model
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(_all_reduce)
        layer.mlp.register_forward_hook(_all_reduce)
    if shard.vocab_parallel:
        model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, shard.vocab_start, shard.vocab)
        model.lm_head = VocabParallelHead(model.lm_head, shard.world)
    model._tp_parallel = True
    return model


def tp_rank_world() -> tuple[int, int] | None:
    """(rank, world size) of the tensor-parallel group this process is in (None: none)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _leave_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> tuple[int, int] | None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), NCCL for a
    CUDA device and gloo otherwise; None when launched alone. Every rank then seeds torch's global
    generator alike (rank 0 draws the seed), so unseeded sampling picks the same tokens everywhere.
    timeout_s bounds every collective: a rank that dies ends the others with an error, not a hang."""
    import atexit
    import datetime
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_available():
        raise Qwen2Error("this torch build has no torch.distributed: tensor parallelism needs it")
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if not dist.is_backend_available(backend):
            raise Qwen2Error(f"torch.distributed backend {backend!r} is not available in this torch build")
        if backend == "nccl":
            gpus, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", world))
            if local > gpus:
                raise Qwen2Error(f"{local} ranks on this node but {gpus} GPU(s): one rank per GPU "
                                 f"(--nproc-per-node {gpus} at most)")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        # Tear the group down while the interpreter is whole: left to interpreter exit, gloo's
        # worker threads can outlive what they reference and abort the process (SIGABRT).
        atexit.register(_leave_group)
    seed = torch.randint(0, 2 ** 62, (1,)) if dist.get_rank() == 0 else torch.zeros(1, dtype=torch.long)
    if str(device).startswith("cuda"):
        seed = seed.cuda()
    dist.broadcast(seed, 0)
    torch.manual_seed(int(seed.item()))
    return dist.get_rank(), dist.get_world_size()


# Bytes per weight of a decoder layer's linears by dtype; int8/int4 add a float16 scale per group
# of 128 inputs (and int4 a zero point), as the family's GPTQ releases store them.
_LINEAR_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1 + 2 / 128, "int4": 0.5 + 2.5 / 128}


def rank_memory(config: ModelConfig, world: int, dtype: str = "bfloat16") -> dict:
    """What one rank of `world` holds of `config` in `dtype` (float32, bfloat16, float16, int8 or
    int4 linears): {"weights": bytes, "kv_per_token": bytes}, counted on a meta model of the rank's
    share (embeddings, norms and the head stay in 16-bit float for int8/int4)."""
    shard = TPShard(config, 0, world) if world > 1 else None
    with torch.device("meta"):
        if shard is not None:
            model = shard.build()
        else:
            from qwen2.model.decoder import Qwen2
            model = Qwen2(config)
    per = _LINEAR_BYTES[dtype]
    other = 4.0 if dtype == "float32" else 2.0
    total = 0.0
    for p in {id(p): p for p in model.parameters()}.values():
        # (2-D weights inside the decoder layers are the linears; the router is tiny either way)
        total += p.numel() * (per if p.dim() == 2 and p is not getattr(model.model.embed_tokens, "weight", None)
                              and p is not model.lm_head.weight else other)
    kv_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    cfg = shard.config if shard is not None else config
    return {"weights": int(total), "kv_per_token": cfg.kv_bytes_per_token(kv_dtype)}


def spawn_local_ranks(n: int, argv: list[str]) -> list:
    """Make this process rank 0 of an n-rank group on this machine and start ranks 1..n-1 as
    `python -m qwen2.cli *argv` (what `qwen2 serve --tensor-parallel-size N` does; across
    machines, use torchrun: docs/distributed.md). Each rank gets its share of the cores. Returns
    the started processes; call init_from_env() next."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or n) // n)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n), RANK="0",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(n))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return [subprocess.Popen([sys.executable, "-m", "qwen2.cli", *argv],
                             env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r)), stdin=subprocess.DEVNULL)
            for r in range(1, n)]
