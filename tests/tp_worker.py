"""One rank of a tensor-parallel check, run by tests/test_tp.py under `torch.distributed.run`:
loads its share of CKPT as qwen2.load does under torchrun, writes (rank 0) the logits of fixed token
ids, greedy and seeded-sampling continuations, and this rank's peak memory to OUT."""
import json
import os
import resource
import sys

import torch

from qwen2.engine.generate import generate
from qwen2.engine.runner import prepare
from qwen2.engine.sampling import SamplingParams
from qwen2.io.load import load_model
from qwen2.model.tp import init_from_env, parallelize

ckpt, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
tp = init_from_env("cpu", timeout_s=120)
model = load_model(ckpt, dtype="float32", tp=tp)
prepare(model, mode)
parallelize(model)
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (2, 11), generator=g)
with torch.inference_mode():
    logits = model(ids)
prompts = [ids[0].tolist(), ids[1, :5].tolist()]
greedy = [c.token_ids for c in generate(model, prompts, SamplingParams(temperature=0, max_new_tokens=12))]
# Unseeded sampling: the ranks must draw the same tokens (init_from_env seeds them alike).
sampled = [c.token_ids for c in generate(model, prompts, SamplingParams(temperature=1.0, max_new_tokens=12))]
all_sampled = [None] * tp[1]
torch.distributed.all_gather_object(all_sampled, sampled)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in
              list(model.parameters()) + list(model.buffers())}.values())
peaks = [None] * tp[1]
torch.distributed.all_gather_object(peaks, {"peak_rss": peak, "weights": weights})
if tp[0] == 0:
    torch.save({"logits": logits, "greedy": greedy, "sampled": all_sampled, "memory": peaks,
                "heads": model.config.num_attention_heads, "kv_heads": model.config.num_key_value_heads}, out)
    json.dumps(peaks)
# Every rank waits for rank 0's file before any tears down; then leave without running the
# interpreter's teardown, where a gloo thread rarely aborted a finished rank (SIGABRT, seen 2 in ~25
# runs on a loaded machine) after all the checked results were written.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
