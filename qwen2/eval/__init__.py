"""Evaluations on the engine: benchmarks with lm-eval's prompts and metrics (`qwen2 eval`,
evaluate.py), the lm-eval model (harness.py), needle-in-a-haystack (needle.py)."""
