"""Shared test helpers: random-weight checkpoints written by `transformers` in the official layout."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import torch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_theta=1_000_000.0, tie_word_embeddings=True)

TINY_MOE = dict(TINY, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=96, norm_topk_prob=False, tie_word_embeddings=False)


def hf_model(config: dict, seed: int = 0, std: float = 0.05):
    """A transformers Qwen2/Qwen2-MoE model with random weights (std large enough that logits
    are not all near zero), in float32 and eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
    config = dict(config)
    moe = config.get("num_experts", 0) > 0
    config.pop("model_type", None)
    cfg = (Qwen2MoeConfig if moe else Qwen2Config)(**config)
    torch.manual_seed(seed)
    model = (Qwen2MoeForCausalLM if moe else Qwen2ForCausalLM)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.float().eval()


def peft_lora(config: dict, seed: int, scale: float, **lora):
    """PEFT's LoRA over hf_model(config) with random (not zero) adapter weights, so the adapter
    changes the model; `lora` is peft.LoraConfig's arguments."""
    import peft
    model = peft.get_peft_model(hf_model(config), peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def make_hf_checkpoint(path, config: dict, seed: int = 0, std: float = 0.05, dtype=torch.float32,
                       max_shard_size: str | None = None):
    """Save a random-weight model with transformers' own save_pretrained; returns (model, path)."""
    model = hf_model(config, seed, std)
    path = Path(path)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, **kw)
    model.float()
    return model, path


def read_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def default_sigint():
    """preexec_fn for a child that a test interrupts: SIGINT back to its default. A test run started
    in the background from a non-interactive shell inherits SIGINT ignored, and Python then keeps
    it ignored: Ctrl-C / SIGINT would never reach the program under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
