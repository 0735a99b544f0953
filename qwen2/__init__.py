"""qwen2: the Qwen2 LLM family in lean, fast, hackable PyTorch."""
from .checkpoint import load_model, save_model
from .config import PRESETS, ModelConfig, preset
from .errors import CheckpointError, Qwen2Error
from .model import KVCache, Qwen2

__version__ = "0.1.0"

__all__ = ["load_model", "save_model", "ModelConfig", "PRESETS", "preset", "Qwen2", "KVCache",
           "Qwen2Error", "CheckpointError"]
