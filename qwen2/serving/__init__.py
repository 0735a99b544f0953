"""Serving: continuous-batching engine (engine.py, kv_cache.py) and the OpenAI-compatible HTTP
layer (app.py, protocol.py, tool_calls.py). `qwen2 serve` (commands/serve.py) wires them up."""
