"""The OpenAI-compatible HTTP server: protocol models, routes, metrics. A thin shell over the engine."""
