"""`qwen2 finetune` end to end on a tiny random checkpoint with the real Qwen tokenizer: the data
formats (which tokens are scored), the trainer's losses against transformers + PEFT on the adapter
it saved, resume after Ctrl-C, merge, and qwen2.load(adapter=...)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from util import default_sigint

import qwen2
from qwen2.errors import Qwen2Error
from qwen2.model.decoder import IGNORE_INDEX
from qwen2.train import data as D

peft = pytest.importorskip("peft")

CHATS = [{"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"It is {2 * i}."},
                       {"role": "user", "content": "And times two?"},
                       {"role": "assistant", "content": f"{4 * i}, of course."}]} for i in range(12)]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# One thread a process: on a busy 2-core machine, two-thread regions wait on descheduled threads.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(*args, check=True, env=ENV):
    r = subprocess.run([sys.executable, "-m", "qwen2", "finetune", "--no-progress", *map(str, args)],
                       capture_output=True, text=True, timeout=300, env=env)
    if check and r.returncode:
        raise AssertionError(r.stderr[-3000:])
    return r


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_chat_records_score_assistant_turns_only(ckpt):
    tok = qwen2.load_tokenizer(ckpt)
    ids, labels = D.sft_example(tok, CHATS[3], D._Where("x", 1))
    assert ids == tok.encode_chat(CHATS[3]["messages"], add_generation_prompt=False)
    scored = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(scored) == "It is 6.<|im_end|>\n12, of course.<|im_end|>\n"
    # prompt/completion: the completion and eos; text: everything
    ids, labels = D.sft_example(tok, {"prompt": "2+2=", "completion": " 4"}, D._Where("x", 2))
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == " 4" + tok.decode([tok.eos_token_id])
    assert tok.decode(ids) == "2+2= 4" + tok.decode([tok.eos_token_id])
    ids, labels = D.sft_example(tok, {"text": "hello"}, D._Where("x", 3))
    assert ids == labels == tok.encode("hello") + [tok.eos_token_id]
    # conversational prompt/completion: only the completion's assistant turn
    rec = {"prompt": CHATS[0]["messages"][:4], "completion": CHATS[0]["messages"][4:]}
    ids, labels = D.sft_example(tok, rec, D._Where("x", 4))
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "0, of course.<|im_end|>\n"


def test_bad_records_name_their_line_and_truncation_is_counted(tmp_path, ckpt):
    tok = qwen2.load_tokenizer(ckpt)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n\n" + "{not json\n")
    with pytest.raises(Qwen2Error, match=r"d.jsonl:3: not valid JSON"):
        D.load_sft(f, tok, 64)
    _write(f, [{"text": "ok"}, {"messages": [{"role": "user"}]}])
    with pytest.raises(Qwen2Error, match=r"d.jsonl:2: \"messages\"\[0\] must be an object"):
        D.load_sft(f, tok, 64)
    _write(f, [{"text": "ok"}, {"input": "x"}])
    with pytest.raises(Qwen2Error, match=r"d.jsonl:2: unknown record format"):
        D.load_sft(f, tok, 64)
    _write(f, [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(Qwen2Error, match=r"d.jsonl:1: .*missing \"rejected\""):
        D.load_dpo(f, tok, 64)
    _write(f, [{"text": "word " * 50}, {"text": "short"}, {"text": "word " * 40}])
    data = D.load_sft(f, tok, 16)
    assert data.records == 3 and len(data.examples) == 3 and data.truncated == 2
    assert all(len(i) <= 16 for i, _ in data.examples)
    packed = D.load_sft(f, tok, 16, packing=True)
    assert sum(len(i) for i, _ in packed.examples) == sum(len(i) for i, _ in D.load_sft(f, tok, 10_000).examples)
    assert all(len(i) == 16 for i, _ in packed.examples[:-1])


def _hf_lora(ckpt, adapter_dir):
    from transformers import Qwen2ForCausalLM
    base = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _hf_logprobs(model, rows, pad):
    """Per-row sums of log p(label) and counts, from transformers' logits."""
    ids, mask, labels = D.collate(rows, pad)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1)
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    tok = lp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * keep
    return tok.sum(-1), keep.sum(-1)


def test_lora_sft_eval_loss_equals_transformers_with_the_saved_adapter(tmp_path, ckpt):
    data = _write(tmp_path / "train.jsonl", CHATS + [{"prompt": f"Q{i}", "completion": " A"} for i in range(4)])
    out = tmp_path / "out"
    _cli("--model", ckpt, "--data", data, "--eval-data", data, "--output", out, "--max-steps", 3,
         "--batch-size", 4, "--lr", 1e-2, "--lora-r", 4, "--lora-targets", "q_proj,v_proj,gate_proj,down_proj")
    steps = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["tokens_per_s"] > 0 for r in steps)
    final = [r for r in _log(out) if "eval_loss" in r][-1]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj", "gate_proj", "down_proj"] and cfg["r"] == 4

    tok = qwen2.load_tokenizer(ckpt)
    rows = D.load_sft(data, tok, 1024).examples
    s, n = _hf_logprobs(_hf_lora(ckpt, out), rows, tok.pad_token_id)
    want = (-s.sum() / n.sum()).item()
    assert abs(final["eval_loss"] - want) < 1e-4 * want, (final, want)
    assert steps[-1]["loss"] < steps[0]["loss"]

    # qwen2.load(adapter=...) gives the merged model: the same logits as PEFT
    llm = qwen2.load(ckpt, dtype="float32", adapter=out, mode="eager")
    ids = torch.tensor([rows[0][0]])
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), _hf_lora(ckpt, out)(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_dpo_eval_equals_the_closed_form_on_transformers(tmp_path, ckpt):
    pairs = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
              "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
              "rejected": [{"role": "assistant", "content": f"Maybe {2 * i + 1}, or not."}]} for i in range(8)]
    pairs += [{"prompt": f"Say yes {i}:", "chosen": " yes", "rejected": " no thanks"} for i in range(4)]
    data = _write(tmp_path / "dpo.jsonl", pairs)
    out = tmp_path / "out"
    beta = 0.5
    _cli("--model", ckpt, "--data", data, "--eval-data", data, "--output", out, "--method", "dpo",
         "--beta", beta, "--max-steps", 3, "--batch-size", 4, "--lr", 2e-2, "--lora-r", 4, "--lora-dropout", 0)
    log = _log(out)
    first = log[0]
    assert abs(first["loss"] - torch.log(torch.tensor(2.0)).item()) < 1e-6  # policy == reference at step 1
    final = [r for r in log if "eval_loss" in r][-1]

    tok = qwen2.load_tokenizer(ckpt)
    prs = D.load_dpo(data, tok, 1024).pairs
    rows = D.dpo_rows(prs)
    model = _hf_lora(ckpt, out)
    pol, _ = _hf_logprobs(model, rows, tok.pad_token_id)
    with model.disable_adapter():
        ref, _ = _hf_logprobs(model, rows, tok.pad_token_id)
    n = len(prs)
    rc, rr = beta * (pol[:n] - ref[:n]), beta * (pol[n:] - ref[n:])
    loss = -torch.nn.functional.logsigmoid(rc - rr)
    assert abs(final["eval_loss"] - loss.mean().item()) < 1e-4
    assert abs(final["eval_reward_margin"] - (rc - rr).mean().item()) < 1e-4
    assert final["eval_reward_accuracy"] == (rc > rr).double().mean().item()
    assert abs(final["eval_rewards_chosen"] - rc.mean().item()) < 1e-4


def test_dpo_rpo_alpha_adds_the_chosen_replies_mean_token_nll(tmp_path, ckpt):
    """--rpo-alpha A: each pair's loss is DPO's plus A x the chosen reply's mean token NLL (TRL's
    rpo_alpha); at step 1 (policy == reference) that is log 2 + A x the base model's NLL."""
    from transformers import Qwen2ForCausalLM
    pairs = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
              "chosen": [{"role": "assistant", "content": f"It is {2 * i}, I think." if i % 2 else f"{2 * i}"}],
              "rejected": [{"role": "assistant", "content": f"Maybe {2 * i + 1}."}]} for i in range(6)]
    data = _write(tmp_path / "dpo.jsonl", pairs)
    out = tmp_path / "out"
    alpha = 0.5
    _cli("--model", ckpt, "--data", data, "--output", out, "--method", "dpo", "--rpo-alpha", alpha,
         "--max-steps", 1, "--batch-size", 6, "--lr", 1e-3, "--lora-r", 4, "--lora-dropout", 0)
    first = _log(out)[0]
    tok = qwen2.load_tokenizer(ckpt)
    prs = D.load_dpo(data, tok, 1024).pairs
    base = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    lp, k = _hf_logprobs(base, D.dpo_rows(prs)[:len(prs)], tok.pad_token_id)
    nll = (-lp / k).mean().item()
    assert abs(first["nll_chosen"] - nll) < 1e-4
    assert abs(first["loss"] - (torch.log(torch.tensor(2.0)).item() + alpha * nll)) < 1e-4


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_the_same_run(tmp_path, ckpt):
    data = _write(tmp_path / "train.jsonl", CHATS)
    args = ["--model", ckpt, "--data", data, "--max-steps", 16, "--batch-size", 2, "--lr", 5e-3, "--lora-r", 2,
            "--lora-targets", "q_proj,o_proj", "--seed", 3]  # dropout on: the RNG state must resume too
    _cli(*args, "--output", tmp_path / "straight")
    out = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "-m", "qwen2", "finetune", "--no-progress", *map(str, args), "--output",
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and len(_log(out)) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    stopped_at = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert 3 <= stopped_at < 16 and "--resume" in stdout
    assert not (out / "adapter_model.safetensors").exists()
    _cli(*args, "--output", out, "--resume")
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 17))
    from safetensors.torch import load_file
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    r = _cli(*args, "--output", tmp_path / "none", "--resume", check=False)
    assert r.returncode == 1 and "no checkpoint" in r.stderr


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, ckpt):
    """A finished 2-step run resumed with --max-steps 4 goes on along the 4-step cosine (the saved
    run's last learning rate was 0): its learning rates are a straight 4-step run's."""
    data = _write(tmp_path / "train.jsonl", CHATS[:4])
    args = ["--model", ckpt, "--data", data, "--batch-size", 2, "--lr", 5e-3, "--lora-r", 2, "--lora-targets", "q_proj"]
    _cli(*args, "--max-steps", 4, "--output", tmp_path / "straight")
    _cli(*args, "--max-steps", 2, "--output", tmp_path / "chain")
    _cli(*args, "--max-steps", 4, "--output", tmp_path / "chain", "--resume")
    want = [r["lr"] for r in _log(tmp_path / "straight")]
    got = [r["lr"] for r in _log(tmp_path / "chain")]
    assert [r["step"] for r in _log(tmp_path / "chain")] == [1, 2, 3, 4]
    assert got[2:] == pytest.approx(want[2:]) and got[2] == pytest.approx(5e-3 * 0.5)


def test_full_weights_and_merge_write_checkpoints_transformers_loads(tmp_path, ckpt):
    from transformers import Qwen2ForCausalLM
    data = _write(tmp_path / "train.jsonl", CHATS[:4])
    _cli("--model", ckpt, "--data", data, "--output", tmp_path / "full", "--method", "full", "--max-steps", 2,
         "--lr", 1e-3, "--gradient-checkpointing")
    _cli("--model", ckpt, "--data", data, "--output", tmp_path / "lora", "--max-steps", 2, "--lr", 1e-2, "--merge",
         "--lora-dropout", 0)
    ids = torch.tensor([D.load_sft(data, qwen2.load_tokenizer(ckpt), 1024).examples[0][0]])
    with torch.no_grad():
        for got_dir, want in ((tmp_path / "full", None), (tmp_path / "lora" / "merged", _hf_lora(ckpt, tmp_path / "lora"))):
            theirs = Qwen2ForCausalLM.from_pretrained(got_dir, dtype=torch.float32).eval()(input_ids=ids).logits
            ours = qwen2.load_model(got_dir, dtype="float32")(ids)
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
            if want is not None:
                torch.testing.assert_close(theirs, want(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
            base = qwen2.load_model(ckpt, dtype="float32")(ids)
            assert (ours - base).abs().max() > 1e-3  # it trained


def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path, ckpt):
    """FSDP2 data parallel: 2 processes x 2 examples == 1 process x 4, step by step."""
    data = _write(tmp_path / "train.jsonl", CHATS)
    args = ["--model", ckpt, "--data", data, "--max-steps", 3, "--lr", 1e-2, "--lora-r", 4, "--lora-dropout", 0,
            "--grad-accum", 2]
    _cli(*args, "--output", tmp_path / "one", "--batch-size", 4)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qwen2",
                        "finetune", "--no-progress", *map(str, args), "--output", str(tmp_path / "two"),
                        "--batch-size", "2"], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-5 * a["loss"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"], (a, b)
    from safetensors.torch import load_file
    x = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    y = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=2e-4 * x[k].abs().max().item() + 1e-7, rtol=1e-3, msg=k)


def test_qlora_on_a_quantized_checkpoint(tmp_path, ckpt):
    """`qwen2 quantize` output trains as it is (int4 linears and an int8 head, no float copy); the
    trainer's eval loss (scored rows only, gradients through the int4 kernels' dequantized weights)
    equals the quantized model's own full-logits loss with the saved adapter."""
    from qwen2.io.adapter import load_adapter
    from qwen2.quant.linear import QuantLinear
    q4 = tmp_path / "q4"
    r = subprocess.run([sys.executable, "-m", "qwen2", "quantize", str(ckpt), str(q4), "--bits", "4"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    data = _write(tmp_path / "train.jsonl", CHATS[:8])
    out = tmp_path / "out"
    _cli("--model", q4, "--data", data, "--eval-data", data, "--output", out, "--method", "qlora", "--max-steps", 3,
         "--lr", 1e-2, "--lora-dropout", 0)
    final = [x for x in _log(out) if "eval_loss" in x][-1]
    model = load_adapter(qwen2.load_model(q4, dtype="float32"), out)
    assert isinstance(model.lm_head, QuantLinear)
    tok = qwen2.load_tokenizer(ckpt)
    ids, mask, labels = D.collate(D.load_sft(data, tok, 1024).examples, tok.pad_token_id)
    with torch.no_grad():
        loss = model(ids, attention_mask=mask, labels=labels).loss.item()
    assert abs(final["eval_loss"] - loss) < 1e-4 * loss
    assert _cli("--model", q4, "--data", data, "--output", tmp_path / "x", check=False).stderr.count("--method qlora") == 1
