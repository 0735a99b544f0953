"""The OpenAI-compatible HTTP server, a thin shell over the engine: app.py (routes, API key),
protocol.py (pydantic wire models), errors.py, inputs.py, jobs.py, responses.py (bodies, SSE),
metrics.py (Prometheus /metrics)."""
