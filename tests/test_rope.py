"""Rotary types against transformers: YaRN (and linear) frequencies, attention factor and logits
beyond the original window, in both config.json forms."""
import json

import pytest
import torch
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from util import TINY, make_hf_checkpoint

from qwen2 import CheckpointError, load_model
from qwen2.model.config import ModelConfig
from qwen2.model.rope import ntk_alpha, rope_init

BASE = dict(TINY, max_position_embeddings=256)

ROPE_CASES = [
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},  # the Qwen2 README form
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "mscale": 0.8,
     "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.5,
     "truncate": False},
    {"rope_type": "linear", "factor": 3.0},
]


@pytest.mark.parametrize("rs", ROPE_CASES)
def test_rope_init_matches_transformers(rs):
    d = dict(BASE, rope_theta=10000.0, rope_scaling=dict(rs))
    hf_cfg = Qwen2Config(**d)
    inv_ref, att_ref = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](hf_cfg, "cpu")
    inv, att = rope_init(ModelConfig.from_hf_dict(dict(d, model_type="qwen2")))
    torch.testing.assert_close(inv, inv_ref, rtol=0, atol=0)
    assert att == pytest.approx(att_ref, rel=1e-12)


@pytest.mark.parametrize("rs", ROPE_CASES[:3])
def test_yarn_logits_match_transformers_beyond_window(tmp_path, rs):
    hf, path = make_hf_checkpoint(tmp_path, dict(BASE, rope_scaling=dict(rs)))
    model = load_model(path, dtype="float32")
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 200))  # original window is 32..128 tokens
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model(ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    # Cached decode far past the window gives the same logits as the whole forward.
    cache = model.new_cache(2, 210)
    model(ids[:, :190], cache=cache, logits_to_keep=1)
    for i in range(190, 200):
        step = model(ids[:, i:i + 1], cache=cache)
        torch.testing.assert_close(step[:, 0], ref[:, i], rtol=1e-4, atol=1e-4)


def test_yarn_2024_config_form_and_it_matters(tmp_path):
    """The released configs put rope_scaling at top level with "type"; same logits as the
    transformers-5 form, and different from plain rope beyond the window (the test can fail)."""
    rs = ROPE_CASES[0]
    hf, path = make_hf_checkpoint(tmp_path, dict(BASE, rope_scaling=dict(rs)))
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=TINY["rope_theta"], rope_scaling=dict(rs))
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_model(path, dtype="float32")
    assert model.config.rope_type == "yarn"
    ids = torch.randint(0, TINY["vocab_size"], (1, 150))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(model(ids), ref, rtol=1e-4, atol=1e-4)

    cfg.pop("rope_scaling")
    (path / "config.json").write_text(json.dumps(cfg))
    plain = load_model(path, dtype="float32")(ids)
    assert (plain[:, 100:] - ref[:, 100:]).abs().max() > 1e-2


def test_unknown_rope_type_is_a_clear_error():
    with pytest.raises(CheckpointError, match="longrope"):
        rope_init(ModelConfig.from_hf_dict(dict(BASE, model_type="qwen2", rope_scaling={"rope_type": "longrope",
                                                                                        "factor": 2.0})))


def test_ntk_alpha_formula():
    # SPEC: alpha = max(2 ** ceil(log2(L / seq_length) + 1) - 1, 1)
    assert [ntk_alpha(n, 8192) for n in (1, 8192, 8193, 16384, 16385, 32768, 32769)] == [1, 1, 3, 3, 7, 7, 15]
