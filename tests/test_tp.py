"""Tensor parallelism (qwen2.model.tp): N gloo ranks on the CPU, launched by torch's own launcher,
give the single-process model's logits and greedy tokens, sample alike, and each holds only its
share of the weights. Configs at the real dimensions of released models use fewer layers (and, for
the largest, a smaller vocabulary: the vocabulary split is covered at full size by the 0.5B case)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen2.engine.generate import generate
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error
from qwen2.io.load import load_model
from qwen2.model.config import ModelConfig, preset
from qwen2.model.tp import TPShard, check_tp_size, rank_memory, valid_tp_sizes
from util import TINY, TINY_MOE, make_hf_checkpoint

WORKER = Path(__file__).with_name("tp_worker.py")
_port = iter(range(29600, 29700))


def run_ranks(ckpt, world: int, tmp_path, mode="auto") -> dict:
    out = tmp_path / f"tp{world}_{mode}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
           f"--master-port={next(_port)}", str(WORKER), str(ckpt), str(out), mode]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=True)


def reference(ckpt) -> tuple[torch.Tensor, list]:
    model = load_model(ckpt, dtype="float32")
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(ids)
    prompts = [ids[0].tolist(), ids[1, :5].tolist()]
    greedy = [c.token_ids for c in generate(model, prompts, SamplingParams(temperature=0, max_new_tokens=12))]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return logits, greedy, weights


def check(ckpt, world, tmp_path, mode="auto", tol=1e-4):
    ref_logits, ref_greedy, full_weights = reference(ckpt)
    got = run_ranks(ckpt, world, tmp_path, mode)
    scale = ref_logits.abs().max()
    assert (got["logits"] - ref_logits).abs().max() <= tol * max(1.0, float(scale))
    assert got["greedy"] == ref_greedy
    assert all(s == got["sampled"][0] for s in got["sampled"])  # unseeded sampling in lockstep
    return got, full_weights


TINY_KV2 = dict(TINY, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("mode", ["auto", "eager"])
def test_tiny_two_ranks(tmp_path, mode):
    _, ckpt = make_hf_checkpoint(tmp_path / "m", TINY_KV2)
    got, _ = check(ckpt, 2, tmp_path, mode)
    assert (got["heads"], got["kv_heads"]) == (2, 1)


def test_kv_heads_replicated_when_ranks_outnumber_them(tmp_path):
    _, ckpt = make_hf_checkpoint(tmp_path / "m", dict(TINY, num_attention_heads=4, num_key_value_heads=1,
                                                       tie_word_embeddings=False))
    got, _ = check(ckpt, 2, tmp_path)
    assert (got["heads"], got["kv_heads"]) == (2, 1)


def test_moe_experts_divided(tmp_path):
    _, ckpt = make_hf_checkpoint(tmp_path / "m", TINY_MOE)
    check(ckpt, 2, tmp_path)


def _real(name, layers, **over):
    c = preset(name).to_hf_dict()
    c.update(num_hidden_layers=layers, **over)
    c.pop("torch_dtype", None)
    c.pop("layer_types", None)
    c.pop("dtype", None)
    return c


def test_qwen2_0_5b_dims_full_vocabulary(tmp_path):
    _, ckpt = make_hf_checkpoint(tmp_path / "m", _real("Qwen2-0.5B", 2), std=0.02)
    got, full = check(ckpt, 2, tmp_path)
    planned = rank_memory(ModelConfig.from_file(ckpt / "config.json"), 2, "float32")["weights"]
    for m in got["memory"]:
        # Each rank holds half of the (tied, vocabulary-split) embedding and of every layer, as
        # the planner (`qwen2 info --tensor-parallel-size`) counts it.
        assert m["weights"] < 0.55 * full
        assert abs(m["weights"] - planned) < 0.001 * planned


@pytest.mark.slow
def test_qwen2_1_5b_dims_four_ranks_replicate_kv_heads(tmp_path):
    # 12 heads, 2 KV heads: at 4 ranks each KV head is held by the 2 ranks whose queries use it.
    _, ckpt = make_hf_checkpoint(tmp_path / "m", _real("Qwen2-1.5B", 1, vocab_size=8192), std=0.02)
    got, _ = check(ckpt, 4, tmp_path)
    assert (got["heads"], got["kv_heads"]) == (3, 1)


@pytest.mark.slow
def test_qwen2_72b_dims_half_the_weights_per_rank(tmp_path):
    # One layer at 72B's width is 0.88 B parameters: stored in bfloat16, run in float32.
    _, ckpt = make_hf_checkpoint(tmp_path / "m", _real("Qwen2-72B", 1, vocab_size=4096), std=0.01,
                                 dtype=torch.bfloat16)
    got, full = check(ckpt, 2, tmp_path, mode="eager")  # eager: no speed pass repacking weights
    for m in got["memory"]:
        assert m["weights"] < 0.52 * full
        # No rank ever holds a full copy: its peak is its half plus the runtime's fixed cost.
        assert m["peak_rss"] < m["weights"] + 0.35 * full


@pytest.mark.slow
def test_moe_57b_dims(tmp_path):
    # Qwen2-57B-A14B's widths with 8 of its 64 experts (each rank holds 4).
    _, ckpt = make_hf_checkpoint(tmp_path / "m", _real("Qwen2-57B-A14B", 1, vocab_size=4096, num_experts=8),
                                 std=0.02, dtype=torch.bfloat16)
    check(ckpt, 2, tmp_path)


def test_sizes_that_do_not_divide_name_the_valid_ones():
    with pytest.raises(Qwen2Error, match=r"28 attention heads.*valid sizes: 1, 2, 4$"):
        check_tp_size(preset("Qwen2-7B"), 8)
    with pytest.raises(Qwen2Error, match=r"14 attention heads.*valid sizes: 1, 2$"):
        check_tp_size(preset("Qwen2-0.5B"), 4)
    # The 72B Int4 release: 29568 / 8 = 3696 columns per rank, not whole 128-column groups (Qwen's
    # own fix pads the width to 29696 = 8 x 29 x 128).
    with pytest.raises(Qwen2Error, match=r"intermediate size 29568 in groups of 128.*valid sizes: 1$"):
        check_tp_size(preset("Qwen2-72B"), 8, group_size=128)
    check_tp_size(preset("Qwen2-72B"), 8)  # bfloat16 splits fine
    assert 8 in valid_tp_sizes(preset("Qwen2-72B"))
    with pytest.raises(Qwen2Error, match="must be >= 1"):
        check_tp_size(preset("Qwen2-0.5B"), 0)


def test_shard_slices_cover_every_weight_once():
    """Over the ranks, every row of q, every KV head, every MLP column and every expert is held
    (KV heads by as many ranks as share them), and nothing else is split."""
    c = ModelConfig.from_hf_dict(dict(TINY_MOE, num_attention_heads=4, num_key_value_heads=1, model_type="qwen2_moe"))
    w = torch.arange(c.num_key_value_heads * c.head_dim)[:, None].float()
    held = [TPShard(c, r, 2).slice("model.layers.0.self_attn.qkv_proj.weight", 1, w) for r in range(2)]
    assert all(torch.equal(h, w) for h in held)  # the one KV head, on both ranks
    experts = [r for r in range(2) for e in range(c.num_experts)
               if TPShard(c, r, 2).slice(f"model.layers.0.mlp.experts.{e}.down_proj.weight", None, w) is not None]
    assert sorted(experts) == [0] * 4 + [1] * 4


def _generate_cmd(ckpt, *extra):
    return ["-m", "qwen2", "generate", "--model", str(ckpt), "--prompt", "Tensor parallel ranks",
            "--max-new-tokens", "10", "--dtype", "float32", "--json", *extra]


def test_torchrun_generate_equals_one_process(ckpt):
    """`torchrun --nproc-per-node 2 -m qwen2 generate` prints, from rank 0 only, what one process
    prints: greedy, and sampling without a seed (every rank draws the same tokens, else the
    collectives would deadlock or the ranks disagree)."""
    import json
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *_generate_cmd(ckpt, "--temperature", "0")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    for extra in (["--temperature", "0"], ["--temperature", "1.0"]):
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                              f"--master-port={next(_port)}", *_generate_cmd(ckpt, *extra)],
                             capture_output=True, text=True, timeout=300, env=env)
        assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
        lines = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1  # rank 1 stays quiet
        if extra[1] == "0":
            assert lines[0]["token_ids"] == json.loads(one.stdout)["token_ids"]
        assert len(lines[0]["token_ids"]) > 0


def test_bad_launches_fail_in_one_line(ckpt, tmp_path):
    """A size that does not divide the model stops every rank with one line; no hang."""
    import shutil
    _, odd = make_hf_checkpoint(tmp_path / "odd", dict(TINY, vocab_size=151936, num_attention_heads=4,
                                                        num_key_value_heads=4, intermediate_size=96))
    for f in Path(ckpt).iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges")):
            shutil.copy(f, odd / f.name)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3",
                        f"--master-port={next(_port)}", *_generate_cmd(odd)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    # One line from each rank; the only traceback is the launcher's own report of failed ranks.
    assert r.stderr.count("qwen2: error: tensor-parallel size 3 does not divide this model (4 attention "
                          "heads); valid sizes: 1, 2, 4") == 3
    assert "/qwen2/" not in r.stderr


def test_missing_backend_fails_in_one_line(ckpt):
    """--device cuda under torchrun needs NCCL; this CPU build of torch has none (a CUDA build
    with fewer GPUs than ranks gets the same kind of line, naming the GPU count)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the missing-backend case cannot happen here")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={next(_port)}", *_generate_cmd(ckpt, "--device", "cuda")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    assert r.stderr.count("qwen2: error: torch.distributed backend 'nccl' is not available") == 2, r.stderr[-2000:]


def test_info_plans_every_released_config(capsys):
    import json
    from qwen2.cli import main
    assert main(["info", "--tensor-parallel-size", "2", "--json"]) == 0
    two = {(r["model"], r["dtype"]): r for r in json.loads(capsys.readouterr().out)}
    assert main(["info", "--tensor-parallel-size", "1", "--json"]) == 0
    one = {(r["model"], r["dtype"]): r for r in json.loads(capsys.readouterr().out)}
    assert {m for m, _ in one} >= {"Qwen2-0.5B", "Qwen2-1.5B", "Qwen2-7B", "Qwen2-72B", "Qwen2-57B-A14B"}
    assert "error" in two["Qwen2-72B", "int4"]  # 29568 / 2 is not whole 128-input groups
    for key, r in one.items():
        if "error" in two[key]:
            continue
        # Everything but the norms (and the router) halves, the KV cache too.
        assert 0.5 <= two[key]["weights"] / r["weights"] < 0.502, key
        assert two[key]["kv_per_token"] * 2 == r["kv_per_token"]
    assert 140e9 < one["Qwen2-72B", "bfloat16"]["weights"] < 150e9  # "about 145 GB"
    assert main(["info", "--tensor-parallel-size", "8", "--json"]) == 0
    eight = {(r["model"], r["dtype"]): r for r in json.loads(capsys.readouterr().out)}
    assert "valid sizes: 1, 2, 4" in eight["Qwen2-7B", "bfloat16"]["error"]
    assert "29568 in groups of 128" in eight["Qwen2-72B", "int4"]["error"]


# ---- serving: `qwen2 serve --tensor-parallel-size 2` -----------------------------------------

def _rank_pid(root: int, rank: int) -> int | None:
    """The pid of tensor-parallel rank `rank` among the descendants of process `root`."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, found = [root], []
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            try:
                env = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and f"LOCAL_RANK={rank}".encode() in env:
                found.append(c)
    return max(found) if found else None  # the rank itself, not a wrapper that re-executed into it


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    from conftest import build_qwen_ckpt
    from test_serving_api import start_server, stop_server
    ckpt = build_qwen_ckpt(tmp_path_factory)
    proc, url = start_server(ckpt, "--tensor-parallel-size", "2", "--max-batch", "8",
                             log_dir=tmp_path_factory.mktemp("tp_serve"))
    yield ckpt, proc, url
    if proc.poll() is None:
        assert stop_server(proc) == 0  # SIGTERM: a clean exit of every rank


def test_serve_tensor_parallel_openai_client(tp_server):
    """Two ranks behind one server: chat and completions (streamed and not, concurrent) equal the
    single-process model's greedy output; sampled requests keep the ranks in step."""
    import asyncio

    import openai
    import qwen2
    from test_serving_api import KEY
    ckpt, proc, url = tp_server
    llm = qwen2.load(ckpt, dtype="float32")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Say something about tensor parallelism."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == llm.chat(messages, max_new_tokens=12, temperature=0).text
    prompts = [f"Request number {i} asks" for i in range(6)]
    want = [llm.generate(p, max_new_tokens=10, temperature=0).text for p in prompts]

    async def one(aclient, p):
        text = ""
        async for chunk in await aclient.completions.create(model="tiny", prompt=p, max_tokens=10,
                                                            temperature=0, stream=True):
            text += chunk.choices[0].text
        return text

    async def main():
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(main()) == want
    # Unseeded sampling: every rank draws alike, or the requests after these would hang.
    for _ in range(2):
        client.completions.create(model="tiny", prompt="Random", max_tokens=8, temperature=1.0)
    assert client.completions.create(model="tiny", prompt=prompts[0], max_tokens=10,
                                     temperature=0).choices[0].text == want[0]


def test_serve_tensor_parallel_rank_death_takes_server_down(ckpt, tmp_path):
    """Kill rank 1 mid-stream: the stream ends (no hang) and the server exits with an error."""
    import httpx
    from test_serving_api import KEY, start_server
    proc, url = start_server(ckpt, "--tensor-parallel-size", "2", log_dir=tmp_path)
    try:
        rank1 = _rank_pid(proc.pid, 1)
        assert rank1 is not None
        with httpx.Client(timeout=120) as c:
            with c.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "prompt": "Long", "max_tokens": 3000, "stream": True,
                                "ignore_eos": True}) as resp:
                lines = resp.iter_lines()
                first = next(lines)
                assert first.startswith("data: ")
                os.kill(rank1, 9)
                try:
                    rest = list(lines)  # must end, not hang
                except httpx.HTTPError:
                    rest = []           # or the connection closes
        assert proc.wait(90) != 0
        assert not rest or rest[-1] == "data: [DONE]" or any("error" in x for x in rest)
    finally:
        if proc.poll() is None:
            proc.kill()
