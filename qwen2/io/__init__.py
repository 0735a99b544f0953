"""Checkpoints in and out: safetensors (Hugging Face layout), GGUF, first-generation Qwen, the hub
and the embedded demo model. Loaders map checkpoint names onto the model's modules."""
