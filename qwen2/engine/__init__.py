"""The one engine that drives the model for every entry point: sampling, per-request state,
scheduling over a paged KV cache, and the model runner (eager or compiled, weight kernels)."""
