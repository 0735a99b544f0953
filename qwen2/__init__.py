"""qwen2: the Qwen2 LLM family in lean, fast, hackable PyTorch.

    model = qwen2.load_model(path_or_id)        # torch.nn.Module: input_ids -> logits
    tok = qwen2.load_tokenizer(path_or_id)      # encode / decode / chat template
    llm = qwen2.load(path_or_id)                # model + tokenizer: generate / stream / chat
"""
from qwen2.io.load import load_model
from qwen2.io.save import save_model
from qwen2.model.config import PRESETS, ModelConfig, preset
from qwen2.errors import CheckpointError, Qwen2Error
from qwen2.model.decoder import KVCache, Qwen2

__version__ = "0.1.0"

# Heavier parts load on first use, so `import qwen2` stays fast.
_LAZY = {"load_tokenizer": "qwen2.io.load", "Tokenizer": "qwen2.text.tokenizer", "load": "qwen2.api",
         "LLM": "qwen2.api", "SamplingParams": "qwen2.engine.sampling"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen2' has no attribute {name!r}")


__all__ = ["load_model", "save_model", "load_tokenizer", "load", "LLM", "Tokenizer", "SamplingParams",
           "ModelConfig", "PRESETS", "preset", "Qwen2", "KVCache", "Qwen2Error", "CheckpointError"]
