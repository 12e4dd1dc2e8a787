"""Prometheus metrics of the ingress, per model, served at GET /metrics.

Each ingress replica keeps its own registry; with several replicas, scrape each (or use Ray's own
metrics export, which Serve also feeds).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tuneserve_requests", "Requests by model, endpoint and HTTP status.",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("tuneserve_prompt_tokens", "Prompt tokens processed.",
                                     ["model"], registry=self.registry)
        self.completion_tokens = Counter("tuneserve_completion_tokens", "Completion tokens generated.",
                                         ["model"], registry=self.registry)
        self.ttft = Histogram("tuneserve_time_to_first_token_seconds", "Time to the first generated token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("tuneserve_request_latency_seconds", "Whole request latency.",
                                 ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.provider_attempts = Counter("tuneserve_provider_attempts", "Attempts per provider and outcome.",
                                         ["provider", "outcome"], registry=self.registry)
        self.key_requests = Counter("tuneserve_key_requests", "Requests admitted per API key.",
                                    ["key"], registry=self.registry)
        self.key_tokens = Counter("tuneserve_key_tokens", "Tokens per API key, prompt or completion.",
                                  ["key", "kind"], registry=self.registry)
        self.key_cost = Counter("tuneserve_key_cost_usd", "Cost in USD per API key, from provider prices.",
                                ["key"], registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
