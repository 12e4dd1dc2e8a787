"""Prometheus metrics of the app, through Ray's metrics export, so that they add up across replicas and nodes.

Every ingress replica records with `ray.util.metrics`, and every engine replica has vLLM's own metrics recorded
the same way (vLLM's `RayPrometheusStatLogger`: queue length, running requests, KV-cache usage, prefix-cache
queries and hits). Ray's agent on each node exports them at the node's metrics export port, with the `ray_`
prefix and labels naming the process; Prometheus scrapes every node there (Ray writes the target list to
`<session dir>/metrics/prom_metrics_service_discovery.json`).

`GET /metrics` gives the same figures for the whole cluster in one scrape: it reads every live node's export
and sums counters and histograms over processes (labels such as WorkerId dropped). Gauges are kept per
replica (`ReplicaId`): a sum of KV-cache fractions means nothing.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict

from ray.util import metrics as ray_metrics

_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
# Families GET /metrics gathers, as Ray exports them.
EXPORTED_PREFIXES = ("ray_tuneserve_", "ray_vllm_")
# Labels that only say which process recorded a figure: summed away.
_PROCESS_LABELS = frozenset({"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId",
                             "instance", "job", "ReplicaId", "application", "deployment", "replica",
                             "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"})
SCRAPE_TIMEOUT_S = 5.0


class _Bound:
    __slots__ = ("metric", "tags")

    def __init__(self, metric, tags: dict[str, str]):
        self.metric, self.tags = metric, tags

    def inc(self, amount: float = 1.0) -> None:
        if amount > 0:  # Ray's counters take positive increments only
            self.metric.inc(amount, tags=self.tags)

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self.tags)


class _Family:
    """prometheus_client's `.labels(...).inc()` over a Ray metric; every sample also carries the app's name."""

    def __init__(self, metric, label_names: list[str], app: str):
        self.metric, self.label_names, self.app = metric, label_names, app

    def labels(self, *values) -> _Bound:
        tags = {name: str(value) for name, value in zip(self.label_names, values)}
        tags["app"] = self.app
        return _Bound(self.metric, tags)


class ServingMetrics:
    def __init__(self, app: str = "") -> None:
        def _counter(name: str, doc: str, labels: list[str]) -> _Family:
            return _Family(ray_metrics.Counter(name, description=doc, tag_keys=(*labels, "app")), labels, app)

        def _histogram(name: str, doc: str, labels: list[str]) -> _Family:
            return _Family(ray_metrics.Histogram(name, description=doc, boundaries=_LATENCY_BUCKETS,
                                                 tag_keys=(*labels, "app")), labels, app)

        # Ray exports a counter named x as ray_x_total.
        self.requests = _counter("tuneserve_requests", "Requests by model, endpoint and HTTP status.",
                                 ["model", "endpoint", "status"])
        self.prompt_tokens = _counter("tuneserve_prompt_tokens", "Prompt tokens processed.", ["model"])
        self.completion_tokens = _counter("tuneserve_completion_tokens", "Completion tokens generated.", ["model"])
        self.ttft = _histogram("tuneserve_time_to_first_token_seconds", "Time to the first generated token.",
                               ["model"])
        self.latency = _histogram("tuneserve_request_latency_seconds", "Whole request latency.",
                                  ["model", "endpoint"])
        self.provider_attempts = _counter("tuneserve_provider_attempts", "Attempts per provider and outcome.",
                                          ["provider", "outcome"])
        self.key_requests = _counter("tuneserve_key_requests", "Requests admitted per API key.", ["key"])
        self.key_tokens = _counter("tuneserve_key_tokens", "Tokens per API key, prompt or completion.",
                                   ["key", "kind"])
        self.key_cost = _counter("tuneserve_key_cost_usd", "Cost in USD per API key, from provider prices.", ["key"])


async def cluster_exposition() -> str:
    """The app's figures from every live node's Ray metrics export, summed over processes (Prometheus text)."""
    import httpx
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    nodes = await asyncio.to_thread(ray.nodes)
    targets = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
               for n in nodes if n.get("Alive") and n.get("MetricsExportPort")]
    async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S) as http:
        answers = await asyncio.gather(*(http.get(url) for url in targets), return_exceptions=True)
    families: dict[str, tuple[str, str]] = {}  # name -> (type, help)
    values: dict[tuple[str, str, tuple], float] = defaultdict(float)  # (family, sample, labels) -> sum
    unreachable = 0
    for answer in answers:
        if isinstance(answer, Exception) or answer.status_code != 200:
            unreachable += 1
            continue
        for family in text_string_to_metric_families(answer.text):
            if not family.name.startswith(EXPORTED_PREFIXES):
                continue
            families[family.name] = (family.type, family.documentation)
            for sample in family.samples:
                dropped = _PROCESS_LABELS - {"ReplicaId"} if family.type == "gauge" else _PROCESS_LABELS
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in dropped))
                values[(family.name, sample.name, labels)] += sample.value
    lines = [f"# tuneserve: {len(targets) - unreachable} of {len(targets)} nodes' Ray metrics exports read"]
    for name in sorted(families):
        kind, doc = families[name]
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        for (family, sample, labels), value in sorted(values.items(), key=lambda item: _order(item[0])):
            if family == name:
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{sample}{{{rendered}}} {_number(value)}" if labels else f"{sample} {_number(value)}")
    return "\n".join(lines) + "\n"


def _order(key: tuple) -> tuple:
    family, sample, labels = key
    # buckets in le order, as Prometheus writes them
    le = next((float(v) for k, v in labels if k == "le"), 0.0)
    return family, sample, tuple((k, v) for k, v in labels if k != "le"), le


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))
