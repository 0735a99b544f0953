"""Checkpoints in and out: safetensors (Hugging Face layout), GGUF, first-generation Qwen, GPTQ, the
hub and the embedded demo model. One module per job: hub (where a checkpoint is), safetensors
(files), names (the name table of each format), build (a model from named tensors), load (what to
load, by what the user names), save (the HF layout); gguf, qwen1 and gptq read (and gptq writes)
their formats."""
