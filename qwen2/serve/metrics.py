"""/metrics: the engine's counters in Prometheus form, read when scraped.

Each app has its own CollectorRegistry (never prometheus_client's global one), so several apps in
one process, as in the tests, do not clash; the collector reads the engine's plain counters at
scrape time, which keeps the engine free of any Prometheus dependency.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

# Paths outside this set count as "other": a label per URL a client tried would let anyone grow
# the series without bound.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class RequestCounts:
    """HTTP requests by (endpoint, status). Only touched from the event loop thread."""

    def __init__(self):
        self.counts: dict[tuple[str, str], int] = {}

    def count(self, path: str, status: int):
        key = (path if path in ENDPOINTS else "other", str(status))
        self.counts[key] = self.counts.get(key, 0) + 1


class ServerCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        e, s = self.state.engine, self.state.engine.stats
        yield _labelled("qwen2_http_requests_total", "HTTP requests by endpoint and status",
                        ("endpoint", "status"), self.state.requests.counts)
        yield GaugeMetricFamily("qwen2_requests_running", "requests in the running batch", value=e.num_running)
        yield GaugeMetricFamily("qwen2_requests_waiting", "requests waiting for KV cache room", value=e.num_waiting)
        # the engine thread adds reasons while we read: copy first
        yield _labelled("qwen2_request_finished_total", "finished engine requests by reason", ("reason",),
                        {(k,): v for k, v in dict(s.finished).items()})
        yield CounterMetricFamily("qwen2_prompt_tokens_total", "prompt tokens processed", value=s.prompt_tokens)
        yield CounterMetricFamily("qwen2_generation_tokens_total", "tokens generated", value=s.generation_tokens)
        yield GaugeMetricFamily("qwen2_generation_tokens_per_second", "generated tokens/s over the last 10 s",
                                value=e.recent_tokens_per_second())
        bounds, total = s.ttft.snapshot()
        yield HistogramMetricFamily("qwen2_time_to_first_token_seconds", "time from arrival to first token",
                                    buckets=[(floatToGoString(b), c) for b, c in bounds], sum_value=total)
        yield GaugeMetricFamily("qwen2_kv_cache_blocks_total", "KV cache blocks in the pool", value=e.pool.num_blocks)
        yield GaugeMetricFamily("qwen2_kv_cache_blocks_used", "KV cache blocks held by requests",
                                value=e.pool.num_blocks - e.num_free_blocks)
        yield CounterMetricFamily("qwen2_engine_steps_total", "engine steps (one model forward each)", value=s.steps)
        yield CounterMetricFamily("qwen2_engine_busy_seconds_total", "time spent in engine steps",
                                  value=s.busy_seconds)
        yield CounterMetricFamily("qwen2_engine_decode_steps_total", "engine steps that only decoded",
                                  value=s.decode_steps)
        yield CounterMetricFamily("qwen2_engine_decode_seconds_total", "time spent in decode-only steps",
                                  value=s.decode_seconds)
        yield CounterMetricFamily("qwen2_preemptions_total", "requests preempted for KV room", value=s.preemptions)
        # automatic prefix caching: admitted prompt tokens, and those whose KV came from cached blocks
        # (a shared system prompt, an earlier turn of the conversation)
        a = e.pool.allocator
        yield CounterMetricFamily("qwen2_prefix_cache_query_tokens_total", "prompt tokens of admitted requests",
                                  value=a.query_tokens)
        yield CounterMetricFamily("qwen2_prefix_cache_hit_tokens_total", "prompt tokens served from the prefix cache",
                                  value=a.hit_tokens)
        yield GaugeMetricFamily("qwen2_prefix_cache_hit_rate", "hit / query prompt tokens since the server started",
                                value=a.hit_rate)
        # speculative decoding (qwen2.engine.speculative): counters, the rates they give, and the
        # load policy (draft tokens per request at this batch; none past spec_max_batch)
        yield CounterMetricFamily("qwen2_spec_verify_steps_total", "verification slices (one request's drafts each)",
                                  value=s.spec_steps)
        yield CounterMetricFamily("qwen2_spec_draft_tokens_total", "draft tokens proposed", value=s.spec_proposed)
        yield CounterMetricFamily("qwen2_spec_accepted_tokens_total", "draft tokens accepted", value=s.spec_accepted)
        yield GaugeMetricFamily("qwen2_spec_acceptance_rate", "accepted / proposed draft tokens",
                                value=s.spec_accepted / s.spec_proposed if s.spec_proposed else 0.0)
        yield GaugeMetricFamily("qwen2_spec_tokens_per_verify_step", "tokens emitted per verification slice",
                                value=s.spec_emitted / s.spec_steps if s.spec_steps else 0.0)
        spec = e.spec
        yield GaugeMetricFamily("qwen2_spec_draft_tokens_per_request", "draft tokens per request at the current batch",
                                value=spec.tokens_per_request(e.num_running) if spec is not None else 0)
        yield GaugeMetricFamily("qwen2_spec_max_batch", "speculation is off above this many running requests",
                                value=spec.max_batch if spec is not None else 0)


def _labelled(name: str, help_: str, labels: tuple[str, ...], values: dict[tuple[str, ...], float]):
    family = CounterMetricFamily(name, help_, labels=labels)
    for key, v in sorted(values.items()):
        family.add_metric(key, v)
    return family


def registry_for(state) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ServerCollector(state))
    return registry


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """(body, content type): OpenMetrics for a scraper that asks for it, else the text format."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
