"""qwen2: the Qwen2 LLM family in lean, fast, hackable PyTorch.

    model = qwen2.load_model(path_or_id)        # torch.nn.Module: input_ids -> logits
    tok = qwen2.load_tokenizer(path_or_id)      # encode / decode / chat template
    llm = qwen2.load(path_or_id)                # model + tokenizer: generate / stream / chat
"""
from .checkpoint import load_model, save_model
from .config import PRESETS, ModelConfig, preset
from .errors import CheckpointError, Qwen2Error
from .model import KVCache, Qwen2

__version__ = "0.1.0"

# Heavier parts load on first use, so `import qwen2` stays fast.
_LAZY = {"load_tokenizer": "tokenizer", "Tokenizer": "tokenizer", "load": "api", "LLM": "api",
         "SamplingParams": "sampling"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'qwen2' has no attribute {name!r}")


__all__ = ["load_model", "save_model", "load_tokenizer", "load", "LLM", "Tokenizer", "SamplingParams",
           "ModelConfig", "PRESETS", "preset", "Qwen2", "KVCache", "Qwen2Error", "CheckpointError"]
