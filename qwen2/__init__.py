"""qwen2: the Qwen2 LLM family in lean, fast, hackable PyTorch.

    model = qwen2.load_model(path_or_id)        # torch.nn.Module: input_ids -> logits
    tok = qwen2.load_tokenizer(path_or_id)      # encode / decode / chat template
    llm = qwen2.load(path_or_id)                # model + tokenizer: generate / stream / chat
"""
import os as _os
import sys as _sys

# One thread policy for every `qwen2` command: OpenMP threads sleep at barriers instead of
# spinning (libgomp reads this once, when torch loads it, hence here, before torch). Spinning
# threads on a machine whose cores other processes want made compiled decoding 2-10x slower
# (0.7 tok/s at worst); passive waiting costs ~10-20% on a quiet machine there, and nothing on the
# default GGUF and float32 paths, whose kernels run on qwen2's own thread pool. A policy the
# user set is kept; Python API users keep their process's own.
if "torch" not in _sys.modules and (_os.path.basename(_sys.argv[0] if _sys.argv else "") == "qwen2"
                                    or _sys.argv[:1] == ["-m"]):
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qwen2.io.load import load_model  # noqa: E402
from qwen2.io.save import save_model  # noqa: E402
from qwen2.model.config import PRESETS, ModelConfig, preset  # noqa: E402
from qwen2.errors import CheckpointError, Qwen2Error  # noqa: E402
from qwen2.model.decoder import KVCache, Qwen2  # noqa: E402

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
